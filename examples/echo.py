"""The core transport on its own: a server and a client calling each other.

Run: python examples/echo.py
"""

import asyncio

import asyncdist


async def shout(text: str) -> str:
    # A handler may call back into whoever called it: connections are symmetric.
    conn = asyncdist.current_connection()
    name = await conn.call("whoami")
    return f"{text.upper()}, {name}!"


async def countdown(n: int):  # an async generator handler: call it with conn.stream()
    for i in range(n, 0, -1):
        yield i
        await asyncio.sleep(0)


async def main() -> None:
    secret = asyncdist.security.generate_secret()
    handlers = {"shout": shout, "countdown": countdown, "add": lambda a, b: a + b}
    client_handlers = {"whoami": lambda: "Meeta"}
    async with asyncdist.serve(handlers, port=0, secret=secret) as server:  # noqa: SIM117 - server.port
        async with asyncdist.connect(port=server.port, secret=secret, handlers=client_handlers) as conn:
            print(await conn.call("add", 2, 3))
            print(await conn.call("shout", "hello"))
            print([i async for i in conn.stream("countdown", 5)])
            try:
                await conn.call("add", 1, "x")
            except TypeError as exc:
                print("remote TypeError:", exc)


if __name__ == "__main__":
    asyncdist.run(main())
