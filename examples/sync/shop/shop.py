"""The seed's Pyro4 shop: accounts, log on and off, deposits and purchases.

As the seed's, except for ``@Pyro4.expose`` on ``Shop`` (Pyro4 4.46 and later
require it too), and the import it needs.
"""

# The seed's own style, kept: (object) bases, %-formatting, dict.keys() loops, an unused local.
# ruff: noqa: UP004, UP031, SIM118

from asyncdist import sync as Pyro4


class Account(object):
    """Each customer has an Account object, which manages the customer's savings."""

    def __init__(self):
        self._balance = 0.0

    def pay(self, price):
        self._balance -= price

    def deposit(self, cash):
        self._balance += cash

    def balance(self):
        return self._balance


@Pyro4.expose
class Shop(object):
    """Manages the accounts: log on and off, the customers' money, and purchases."""

    def __init__(self):
        self.accounts = {}
        self.clients = ["Meeta", "Rashmi", "John", "Ken"]

    def name(self):
        return "BuyAnythingOnline"

    def logOn(self, name):
        if name in self.clients:
            self.accounts[name] = Account()
        else:
            self.clients.append(name)
            self.accounts[name] = Account()

    def logOut(self, name):
        print("logout %s" % name)

    def deposit(self, name, amount):
        try:
            return self.accounts[name].deposit(amount)
        except KeyError:
            raise KeyError("unknown account")  # noqa: B904 - the seed's

    def balance(self, name):
        try:
            return self.accounts[name].balance()
        except KeyError:
            raise KeyError("unknown account")  # noqa: B904 - the seed's

    def allAccounts(self):
        accs = {}
        for name in self.accounts.keys():
            accs[name] = self.accounts[name].balance()
        return accs

    def buy(self, name, price):
        balance = self.accounts[name].balance()  # noqa: F841 - the seed's
        self.accounts[name].pay(price)
