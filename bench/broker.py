"""The broker baseline's two processes: ``python -m bench.broker consume|publish ...``.

``consume`` declares a quorum queue (like every sagaplane work queue), prints ``ready``,
consumes ``--count`` messages with prefetch ``--prefetch`` and acks each one, then prints
one JSON line. ``publish`` publishes ``--count`` persistent messages of ``--size`` bytes
to it with publisher confirms, keeping ``--window`` unconfirmed at most, then prints one
JSON line. Each JSON line holds first/last timestamps (epoch s) and the process's CPU s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aio_pika

from sagaplane.topology import CONTENT_TYPE


async def consume(url: str, queue_name: str, count: int, prefetch: int) -> dict[str, float]:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        done = asyncio.Event()
        seen = 0
        first = last = 0.0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal seen, first, last
            await message.ack()
            seen += 1
            now = time.time()
            if seen == 1:
                first = now
            if seen >= count:
                last = now
                done.set()

        await queue.consume(on_message)
        print("ready", flush=True)
        await done.wait()
    return {"first": first, "last": last, "count": seen, "cpu_s": time.process_time()}


async def publish(
    url: str, queue_name: str, count: int, size: int, window: int
) -> dict[str, float]:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = channel.default_exchange
        body = b"x" * size
        slots = asyncio.Semaphore(window)
        failures = 0

        async def one(i: int) -> None:
            nonlocal failures
            try:
                await exchange.publish(
                    aio_pika.Message(
                        body,
                        message_id=f"baseline-{i}",
                        content_type=CONTENT_TYPE,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=queue_name,
                    mandatory=True,
                )
            except Exception:
                failures += 1
            finally:
                slots.release()

        first = time.time()
        tasks = []
        for i in range(count):
            await slots.acquire()
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        last = time.time()
    return {
        "first": first,
        "last": last,
        "count": count,
        "failures": failures,
        "cpu_s": time.process_time(),
    }


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m bench.broker")
    parser.add_argument("role", choices=["consume", "publish"])
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", default="bench.baseline")
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--size", type=int, default=1300)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--prefetch", type=int, default=256)
    args = parser.parse_args()
    if args.role == "consume":
        result = asyncio.run(consume(args.amqp_url, args.queue, args.count, args.prefetch))
    else:
        result = asyncio.run(publish(args.amqp_url, args.queue, args.count, args.size, args.window))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
