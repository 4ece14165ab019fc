"""Dining philosophers in CSP (Hoare's version): forks and a butler are processes that alternate.

Run:  python examples/csp/dining_philosophers.py [--philosophers 5] [--meals 10]

Each fork is a process that alternates (AltSelect) between its two
philosophers' requests to pick it up, then waits for that one to put it
down. Left to themselves, five philosophers who all pick up their left fork
deadlock; here a butler hands out at most N-1 seats (an OutputGuard that is
offered only while a seat is free, alternating with an InputGuard for
philosophers who stand up), so at least one seated philosopher always gets
both forks. A host watches: it alternates between the philosophers' news and
a TimeoutGuard (were nobody to eat for --patience seconds, 5 by default, it
would call it a deadlock, poison everything and exit 1), and checks that two
neighbours never eat at once.

Each philosopher eats --meals times, then retires its end of the news
channel; when every philosopher has, the host's next alternation raises
ChannelRetired, and the host poisons the forks and the butler, which ends
them. The last line is "each philosopher ate 10 times".
"""

import argparse
import asyncio
import random
import sys

import asyncdist
from asyncdist import csp


@csp.process
async def fork(picks, drops):
    """picks[k] / drops[k]: the reader ends from the k-th of the fork's two philosophers."""
    wanted = [csp.InputGuard(pick) for pick in picks]
    while True:
        guard, _ = await csp.AltSelect(*wanted)  # whichever philosopher asks first (at random if both)
        await drops[wanted.index(guard)]()  # only that philosopher can put it down


@csp.process
async def butler(seats, seat, stand):
    """Hands out at most ``seats`` seats: the seat is offered only while one is free."""
    seated = 0
    while True:
        guards = [csp.InputGuard(stand)]
        if seated < seats:
            guards.append(csp.OutputGuard(seat, "please sit down"))
        guard, _ = await csp.PriSelect(*guards)  # someone leaving comes first
        seated += 1 if isinstance(guard, csp.OutputGuard) else -1


@csp.process
async def philosopher(i, meals, seat, stand, left, right, news):
    """left / right: the (pick up, put down) writer ends of this philosopher's two forks."""
    rng = random.Random(i)
    for _ in range(meals):
        await asyncio.sleep(rng.uniform(0, 0.002))  # think
        await seat()
        await left[0](i)
        await right[0](i)
        await news([i, "eats"])
        await asyncio.sleep(rng.uniform(0, 0.002))  # eat
        await news([i, "is full"])
        await left[1](i)
        await right[1](i)
        await stand(i)
    await csp.retire(news)  # the last philosopher to retire ends the host's alternation


@csp.process
async def host(n, news, restaurant, patience):
    """Count the meals, check that neighbours never eat together; close the restaurant at the end."""
    meals = [0] * n
    eating = set()
    most = 0
    listen, alarm = csp.InputGuard(news), csp.TimeoutGuard(patience)
    while True:
        try:
            guard, msg = await csp.AltSelect(listen, alarm)
        except csp.ChannelRetired:
            break  # every philosopher has left
        if guard is alarm:
            print(f"deadlock? nobody ate for {patience} s; meals so far: {meals}", flush=True)
            await csp.poison(news, *restaurant)
            return None
        i, what = msg
        if what == "eats":
            assert (i - 1) % n not in eating, f"{i} eats beside its left neighbour"
            assert (i + 1) % n not in eating, f"{i} eats beside its right neighbour"
            eating.add(i)
            most = max(most, len(eating))
        else:
            eating.discard(i)
            meals[i] += 1
    await csp.poison(*restaurant)  # the forks and the butler end
    return meals, most


async def main(n, meals, patience):
    seat = csp.One2AnyChannel("seat")
    stand = csp.Any2OneChannel("stand")
    news = csp.Any2OneChannel("news")
    # pick[p][k], drop[p][k]: philosopher p's channels to its left (k=0) and right (k=1) fork
    pick = [[csp.One2OneChannel(f"pick-{p}-{k}") for k in (0, 1)] for p in range(n)]
    drop = [[csp.One2OneChannel(f"drop-{p}-{k}") for k in (0, 1)] for p in range(n)]
    # Fork f is philosopher f's left fork and philosopher f-1's right fork.
    forks = [
        fork(
            [pick[f][0].reader(), pick[(f - 1) % n][1].reader()],
            [drop[f][0].reader(), drop[(f - 1) % n][1].reader()],
        )
        for f in range(n)
    ]
    philosophers = [
        philosopher(
            p,
            meals,
            seat.reader(),
            stand.writer(),
            (pick[p][0].writer(), drop[p][0].writer()),
            (pick[p][1].writer(), drop[p][1].writer()),
            news.writer(),
        )
        for p in range(n)
    ]
    restaurant = [seat, stand, *(c for pair in pick + drop for c in pair)]
    *_, outcome = await csp.Parallel(
        butler(n - 1, seat.writer(), stand.reader()),
        *forks,
        *philosophers,
        host(n, news.reader(), restaurant, patience),
    )
    await csp.shutdown()
    if outcome is None:
        return 1
    eaten, most = outcome
    print(f"{n} philosophers, at most {most} eating at once; meals: {eaten}")
    if len(set(eaten)) != 1:
        print(f"unequal meals: {eaten}")
        return 1
    print(f"each philosopher ate {eaten[0]} times")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--philosophers", type=int, default=5)
    parser.add_argument("--meals", type=int, default=10)
    parser.add_argument("--patience", type=float, default=5.0, help="seconds without a meal = deadlock")
    args = parser.parse_args()
    sys.exit(asyncdist.run(main(args.philosophers, args.meals, args.patience)))
