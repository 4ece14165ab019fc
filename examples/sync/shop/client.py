"""The seed's Pyro4 shop client: Rashmi buys a book, Meeta deposits twice. Run after server.py.

Only the import differs from the seed (``import Pyro4``).
"""

# The seed's own style, kept: class Client(object), %-formatting, dict.keys() loops, an unused import.
# ruff: noqa: UP004, UP031, SIM118, F401

import sys

from asyncdist import sync as Pyro4


# a customer of the shop
class Client(object):
    def __init__(self, name, cash):
        self.name = name
        self.cash = cash

    def doShopping_deposit_cash(self, Shop):
        print("\n*** %s is doing shopping with %s:" % (self.name, Shop.name()))
        print("Log on")
        Shop.logOn(self.name)
        print("Deposit money %s" % self.cash)
        Shop.deposit(self.name, self.cash)
        print("balance=%.2f" % Shop.balance(self.name))
        print("Deposit money %s" % self.cash)
        Shop.deposit(self.name, 50)
        print("balance=%.2f" % Shop.balance(self.name))
        print("Log out")
        Shop.logOut(self.name)

    def doShopping_buying_a_book(self, Shop):
        print("\n*** %s is doing shopping with %s:" % (self.name, Shop.name()))
        print("Log on")
        Shop.logOn(self.name)
        print("Deposit money %s" % self.cash)
        Shop.deposit(self.name, self.cash)
        print("balance=%.2f" % Shop.balance(self.name))
        print("%s is buying a book for %s" % (self.name, 37))
        Shop.buy(self.name, 37)
        print("Log out")
        Shop.logOut(self.name)


if __name__ == "__main__":
    ns = Pyro4.naming.locateNS()
    uri = ns.lookup("example.shop.Shop")
    print(uri)
    Shop = Pyro4.core.Proxy(uri)
    # the customers Meeta and Rashmi
    meeta = Client("Meeta", 50)
    rashmi = Client("Rashmi", 100)
    # buy a book
    rashmi.doShopping_buying_a_book(Shop)
    # deposit money, twice
    meeta.doShopping_deposit_cash(Shop)
    print("")
    print("")
    print("")
    print("")
    # report the balances of Meeta's and Rashmi's accounts
    print("The accounts in the %s:" % Shop.name())
    accounts = Shop.allAccounts()
    for name in accounts.keys():
        print(" %s: %.2f" % (name, accounts[name]))
