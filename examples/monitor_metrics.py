"""Print a fedmq federation's round metrics and node status, one line per message.

Usage: python monitor_metrics.py HOST PORT FEDERATION  (paho-mqtt 2.x, msgpack; docs/PROTOCOL.md)"""

import sys

import msgpack
import paho.mqtt.client as mqtt


def on_connect(client, federation, flags, reason_code, properties):
    if reason_code.is_failure:
        sys.exit(f"connection refused: {reason_code}")
    prefix = f"fedmq/{federation}"  # subscribing here restores the subscriptions on reconnect
    client.subscribe([(f"{prefix}/metrics", 1), (f"{prefix}/status/+", 1)])


def on_message(client, federation, message):
    try:  # an empty payload only clears a retained topic; skip it like a foreign message
        m = msgpack.unpackb(message.payload, raw=False, strict_map_key=True)
    except Exception:  # msgpack raises several types; all mean "not for us" here
        m = None
    if not isinstance(m, dict) or m.get("v") != 1:
        print(f"{message.topic}: not a schema version 1 message, skipped")
    elif m.get("type") == "metrics" and (m["round"], m["model_id"]) not in seen:
        seen.add((m["round"], m["model_id"]))  # metrics come again after an aggregator restart
        acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.4f}"
        print(f"round {m['round']}  accuracy {acc}  participants {len(m['participants'])}"
              f"  up {m['uplink_bytes']} B  down {m['downlink_bytes']} B")  # fmt: skip
    elif m.get("type") == "status":
        print(f"node {m['node_id']}  {m['state']}  round {m.get('round')}")


host, port, federation, seen = sys.argv[1], int(sys.argv[2]), sys.argv[3], set()
sys.stdout.reconfigure(line_buffering=True)  # one line per message, even into a pipe
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311, userdata=federation)
client.on_connect, client.on_message = on_connect, on_message
client.connect(host, port)
client.loop_forever()
