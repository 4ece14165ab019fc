"""The seed's shop client: Rashmi buys a book, Meeta deposits twice, John has no account.

Run after `asyncdist ns` and shop_server.py: python examples/objects/shop_client.py
"""

import asyncdist


class Client:
    def __init__(self, name, cash):
        self.name = name
        self.cash = cash

    async def doShopping_deposit_cash(self, Shop):
        print("\n*** %s is doing shopping with %s:" % (self.name, await Shop.name()))
        print("Log on")
        await Shop.logOn(self.name)
        print("Deposit money %s" % self.cash)
        await Shop.deposit(self.name, self.cash)
        print("balance=%.2f" % await Shop.balance(self.name))
        print("Deposit money %s" % 50)
        await Shop.deposit(self.name, 50)
        print("balance=%.2f" % await Shop.balance(self.name))
        print("Log out")
        await Shop.logOut(self.name)

    async def doShopping_buying_a_book(self, Shop):
        print("\n*** %s is doing shopping with %s:" % (self.name, await Shop.name()))
        print("Log on")
        await Shop.logOn(self.name)
        print("Deposit money %s" % self.cash)
        await Shop.deposit(self.name, self.cash)
        print("balance=%.2f" % await Shop.balance(self.name))
        print("%s is buying a book for %s" % (self.name, 37))
        await Shop.buy(self.name, 37)
        print("Log out")
        await Shop.logOut(self.name)

    async def doShopping_without_logging_on(self, Shop):
        print("\n*** %s deposits without logging on:" % self.name)
        try:
            await Shop.deposit(self.name, self.cash)
        except KeyError as exc:  # the shop's own exception, with the remote traceback attached
            print("refused: %r" % exc)


async def main() -> None:
    async with asyncdist.locate_ns() as ns:
        uri = await ns.lookup("example.shop.Shop")
    print(uri)
    async with asyncdist.Proxy(uri) as Shop:
        meeta = Client("Meeta", 50)
        rashmi = Client("Rashmi", 100)
        john = Client("John", 10)
        await rashmi.doShopping_buying_a_book(Shop)
        await meeta.doShopping_deposit_cash(Shop)
        await john.doShopping_without_logging_on(Shop)
        print("")
        # report the balances of the accounts
        print("The accounts in the %s:" % await Shop.name())
        accounts = await Shop.allAccounts()
        for name in accounts.keys():
            print(" %s: %.2f" % (name, accounts[name]))


if __name__ == "__main__":
    asyncdist.run(main())
