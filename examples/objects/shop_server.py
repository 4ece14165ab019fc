"""The seed's shop server. Run after `asyncdist ns`: python examples/objects/shop_server.py"""

import shop

import asyncdist


async def main() -> None:
    async with asyncdist.locate_ns() as ns, asyncdist.Daemon() as daemon:
        uri = daemon.register(shop.Shop())
        await ns.register("example.shop.Shop", uri)
        print(list((await ns.list(prefix="example.shop.")).keys()), flush=True)
        await daemon.serve_forever()


if __name__ == "__main__":
    asyncdist.run(main())
