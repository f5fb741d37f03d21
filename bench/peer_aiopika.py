#!/usr/bin/env python3
"""The peer a user would otherwise write: the worker's contract subset in Python with aio-pika.

Consumes `<ns>.delete.<instance>` (the queue the ceiling and the worker use), and for each
command: checks the token's SHA-256, decodes and validates the JSON body, does the simulated
delete (nothing), publishes a result event like the worker's (mandatory, persistent) on a
publisher-confirm channel, awaits the confirm, then acks. Stops after `--n` acks and prints one
`RESULT {json}` line; throughput is counted from the first delivery to the last ack.
"""

import argparse
import asyncio
import datetime
import hashlib
import json
import re
import resource
import sys
import time

import aio_pika

DIGITS = re.compile(r"^[1-9][0-9]{6,14}$")


def valid_number(value):
    if not isinstance(value, str):
        return None
    digits = value.strip()
    if digits.startswith("+"):
        digits = digits[1:]
    digits = digits.replace(" ", "").replace("-", "")
    return f"{digits}@s.whatsapp.net" if DIGITS.match(digits) else None


def pct(sorted_values, p):
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), int(-(-p / 100.0 * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    ap.add_argument("--ns", required=True)
    ap.add_argument("--instance", default="bench")
    ap.add_argument("--prefetch", type=int, default=100)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--token", required=True)
    ap.add_argument("--timeout-s", type=float, default=600)
    args = ap.parse_args()

    token_hash = hashlib.sha256(args.token.encode()).digest()
    connection = await aio_pika.connect(args.url, client_properties={"connection_name": "cdw-bench aio-pika peer"})
    publish_channel = await connection.channel(publisher_confirms=True)
    events = await publish_channel.get_exchange(f"{args.ns}.events", ensure=False)
    consume_channel = await connection.channel()
    await consume_channel.set_qos(prefetch_count=args.prefetch)
    queue = await consume_channel.get_queue(f"{args.ns}.delete.{args.instance}", ensure=False)

    state = {"acked": 0, "failed": 0, "first": None, "last": None}
    svc = []
    done = asyncio.Event()

    async def on_message(message):
        received = time.perf_counter()
        if state["first"] is None:
            state["first"] = received
        token = (message.headers or {}).get("token")
        if isinstance(token, str):
            token = token.encode()
        token_ok = isinstance(token, (bytes, bytearray)) and hashlib.sha256(token).digest() == token_hash
        try:
            body = json.loads(message.body)
            chat = valid_number(body.get("number")) if isinstance(body, dict) else None
        except ValueError:
            chat = None
        instance = message.routing_key or args.instance
        ident = message.message_id or ""
        if token_ok and chat:
            status, event_type = 200, "chat.deleted"
            result = {"success": True, "message": "Chat deleted successfully", "chat_jid": chat, "delete_media": False}
        else:
            status, event_type = 400, "chat.delete_failed"
            result = {"success": False, "error": {"message": "Invalid request"}}
        now = datetime.datetime.now(datetime.timezone.utc)
        event = aio_pika.Message(
            body=json.dumps(result, separators=(",", ":")).encode(),
            message_id=ident,
            correlation_id=ident,
            content_type="application/json",
            type=event_type,
            timestamp=now,
            app_id="cdw-bench-aiopika",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={
                "status": status,
                "instance": instance,
                "idempotency_id": ident,
                "attempts": 1,
                "replayed": False,
                "cloudEvents_specversion": "1.0",
                "cloudEvents_id": ident,
                "cloudEvents_source": f"/instances/{instance}",
                "cloudEvents_type": event_type,
                "cloudEvents_time": now.isoformat(timespec="milliseconds"),
            },
        )
        try:
            # With publisher confirms on, publish returns once the broker has confirmed.
            await events.publish(event, routing_key=f"{event_type}.{instance}", mandatory=True)
        except Exception:
            state["failed"] += 1
            await message.nack(requeue=True)
            return
        await message.ack()
        svc.append(time.perf_counter() - received)
        state["acked"] += 1
        if state["acked"] == args.n:
            state["last"] = time.perf_counter()
            done.set()

    cpu0 = time.process_time()
    await queue.consume(on_message)
    try:
        await asyncio.wait_for(done.wait(), timeout=args.timeout_s)
    except asyncio.TimeoutError:
        print(f"peer: only {state['acked']} of {args.n} acked after {args.timeout_s} s", file=sys.stderr)
        await connection.close()
        return 1
    cpu = time.process_time() - cpu0
    secs = state["last"] - state["first"]
    svc.sort()
    await connection.close()
    print("RESULT " + json.dumps({
        "what": "aiopika", "n": args.n, "prefetch": args.prefetch, "secs": secs, "rate": args.n / secs,
        "svc_p50_ms": pct(svc, 50) * 1000, "svc_p99_ms": pct(svc, 99) * 1000,
        "failed": state["failed"], "cpu_s": cpu, "cpu_us_per_cmd": cpu * 1e6 / args.n,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "aio_pika": aio_pika.__version__,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
