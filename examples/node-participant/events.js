// A consumer of Sagaplane's domain events written with nothing but amqplib and the
// CloudEvents 1.0 spec (no Sagaplane code): it reads the events as any consumer in any
// language would, which is what shows that the wire format is the standard one.
//
// Sagaplane publishes each event to the topic exchange `sagaplane.events`, routing key =
// the event's type, in the AMQP binding's structured content mode: content type
// `application/cloudevents+json`, the body the whole event in CloudEvents' JSON format.
//
//   SAGAPLANE_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ node events.js 'order.*' [count]
//
// Binds a private queue to the pattern, prints one JSON line per event
// ({"op": "event", ...}) and exits after `count` events (default: runs until Ctrl-C).
"use strict";

const amqp = require("amqplib");

const REQUIRED = ["specversion", "id", "source", "type"]; // CloudEvents 1.0, section 3.1

function parse(msg) {
  const contentType = msg.properties.contentType || "";
  if (!contentType.startsWith("application/cloudevents+json")) {
    throw new Error(`not a structured-mode CloudEvent: content type ${contentType}`);
  }
  const event = JSON.parse(msg.content.toString("utf8"));
  for (const name of REQUIRED) {
    if (typeof event[name] !== "string" || event[name] === "") {
      throw new Error(`the event has no ${name}`);
    }
  }
  if (event.specversion !== "1.0") throw new Error(`specversion ${event.specversion}`);
  return event;
}

async function main() {
  const url = process.env.SAGAPLANE_AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/";
  const pattern = process.argv[2] || "#";
  const count = Number(process.argv[3] || 0);
  const connection = await amqp.connect(url);
  const channel = await connection.createChannel();
  await channel.assertExchange("sagaplane.events", "topic", { durable: true });
  const { queue } = await channel.assertQueue("", { exclusive: true });
  await channel.bindQueue(queue, "sagaplane.events", pattern);
  console.log(JSON.stringify({ op: "ready", queue, pattern }));
  let seen = 0;
  await channel.consume(queue, async (msg) => {
    if (msg === null) return;
    try {
      const event = parse(msg);
      console.log(
        JSON.stringify({
          op: "event",
          routingKey: msg.fields.routingKey,
          messageId: msg.properties.messageId,
          contentType: msg.properties.contentType,
          event,
        }),
      );
    } catch (err) {
      console.log(JSON.stringify({ op: "rejected", error: String(err) }));
    }
    channel.ack(msg);
    seen += 1;
    if (count > 0 && seen >= count) {
      await channel.close();
      await connection.close();
    }
  });
  process.on("SIGINT", () => connection.close().then(() => process.exit(0)));
  process.on("SIGTERM", () => connection.close().then(() => process.exit(0)));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
