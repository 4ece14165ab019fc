"""The seed's RPyC classic client, blocking as in RPyC: code run on the server, its output here.

Start the server first (classic mode runs any code its clients send, so it must be asked
for twice, the command and the flag; the seed's ``rpyc_classic.py``):

    python -m asyncdist rpc-classic --allow-classic        (listens on 127.0.0.1:18812)

then:  python examples/sync/classic_client.py [PORT]

The first print runs on the server and appears in the server's terminal; after
``c.modules.sys.stdout = sys.stdout``, what the server prints for this
connection appears here: "hi here". What differs from the seed: the import
(``import rpyc``), an optional port argument to ``rpyc.classic.connect`` (18812 by
default, as RPyC's; the seed, as the usage it shows, ``rpyc.classic.connect(host, port)``),
and the seed's typo ``prit('hi here')``, a NameError on the server, is ``print``.
"""

import sys

from asyncdist import sync as rpyc

# the client, connected to the server (the seed: rpyc.classic.connect("localhost"))
c = rpyc.classic.connect("localhost", int(sys.argv[1]) if len(sys.argv) > 1 else 18812)
# run a print statement on the server
c.execute("print('hi python cookbook')")
c.modules.sys.stdout = sys.stdout
c.execute("print('hi here')")  # the seed: prit('hi here')
