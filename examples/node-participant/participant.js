// A Sagaplane participant in plain Node.js: the "shipping" service.
//
// It speaks the wire contract of proto/sagaplane/v1/messages.proto directly, with amqplib
// and the protobuf messages generated into @sagaplane/client (clients/node):
//
//   sagaplane.commands (topic) --action--> sagaplane.participant.shipping (quorum queue)
//       StepCommand --> handler --> StepReply --> sagaplane.replies (direct, key "reply")
//
// A command is acked only after the broker confirmed its reply, so nothing is lost; but
// there is no inbox and no outbox (see README.md): a redelivered command runs its
// handler again, so handlers must be idempotent (these key everything on the step id).
//
//   SAGAPLANE_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/ node participant.js
//
// Logs one JSON object per line on stdout: {"event": "ready" | "handled" | "rejected", ...}.
"use strict";

const amqp = require("amqplib");
const { CommandKind, ReplyOutcome, StepCommand, StepReply } = require("@sagaplane/client");

// -- the topology, exactly as the Python SDK declares it (sagaplane/topology.py) ----------
// Queue arguments are part of the contract: RabbitMQ refuses (PRECONDITION_FAILED) to
// re-declare a queue with different ones.
const COMMANDS_EXCHANGE = "sagaplane.commands";
const REPLIES_EXCHANGE = "sagaplane.replies";
const REPLIES_QUEUE = "sagaplane.replies";
const REPLIES_ROUTING_KEY = "reply";
const DEAD_LETTER_EXCHANGE = "sagaplane.dead-letter";
const DEAD_LETTER_QUEUE = "sagaplane.dead-letter";
const CONTENT_TYPE = "application/x-protobuf";
const COMMAND_TYPE = "sagaplane.v1.StepCommand";
const REPLY_TYPE = "sagaplane.v1.StepReply";

/** Arguments of every queue a consumer works from (topology.work_queue_arguments()). */
function workQueueArguments() {
  return {
    "x-queue-type": "quorum",
    "x-delivery-limit": 5,
    "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
  };
}

function participantQueue(service) {
  return `sagaplane.participant.${service}`;
}

// -- the service -----------------------------------------------------------------------

class StepFailed extends Error {
  /** A failure the participant reports (retryable: whether the coordinator may retry). */
  constructor(message, { type = "StepFailed", retryable = false } = {}) {
    super(message);
    this.type = type;
    this.retryable = retryable;
  }
}

const SERVICE = "shipping";

// Handlers get the decoded command (input, context, output as plain JSON objects) and
// return the step's output (a JSON object), or throw. Any other error is retryable.
const handlers = {
  [CommandKind.COMMAND_KIND_EXECUTE]: {
    "shipping.schedule": async (command) => {
      const address = command.input?.address;
      if (!address) throw new StepFailed("input.address is required", { type: "InvalidInput" });
      // Derived from the step id, so a redelivered command schedules the same shipment.
      // order_id: the input's, which the saga may take from an earlier step's output
      // by reference (the coordinator resolves it before sending the command).
      return {
        shipment_id: `shp-${command.stepId}`,
        address,
        sku: command.input.sku ?? null,
        order_id: command.input.order_id ?? null,
      };
    },
  },
  [CommandKind.COMMAND_KIND_COMPENSATE]: {
    // Compensations are retried until they succeed: "nothing to cancel" is a success.
    "shipping.cancel": async (command) => ({ cancelled: command.output?.shipment_id ?? null }),
  },
};

// -- the consumer ----------------------------------------------------------------------

function log(event, fields) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

/** Decodes and checks a StepCommand; throws on anything that can never be processed. */
function decode(message) {
  const type = message.properties.type;
  if (type && type !== COMMAND_TYPE) throw new Error(`type is ${type}, not ${COMMAND_TYPE}`);
  const command = StepCommand.decode(message.content);
  if (!command.sagaId || !command.stepId || !command.action) {
    throw new Error("StepCommand lacks saga_id, step_id or action");
  }
  if (!(command.kind in handlers)) throw new Error(`StepCommand has no valid kind (${command.kind})`);
  if (command.attempt < 1) throw new Error("StepCommand has no attempt");
  if (!handlers[command.kind][command.action]) throw new Error(`no handler for ${command.action}`);
  return command;
}

/** Runs the handler; returns the StepReply (and the reply's message id). */
async function handle(command) {
  const reply = {
    // Echoed from the command: the coordinator accepts a reply only for the command in
    // flight (same saga, step, attempt and kind) and with its token.
    sagaId: command.sagaId,
    stepId: command.stepId,
    attempt: command.attempt,
    kind: command.kind,
    token: command.token,
  };
  try {
    const output = (await handlers[command.kind][command.action](command)) ?? {};
    reply.outcome = ReplyOutcome.REPLY_OUTCOME_SUCCEEDED;
    // The contract sends an output for actions only.
    if (command.kind === CommandKind.COMMAND_KIND_EXECUTE) reply.output = output;
  } catch (error) {
    const failed = error instanceof StepFailed;
    reply.outcome = ReplyOutcome.REPLY_OUTCOME_FAILED;
    reply.error = {
      type: failed ? error.type : error?.name ?? "Error",
      message: String(error?.message ?? error).slice(0, 4000),
      retryable: failed ? error.retryable : true,
    };
  }
  const kind = command.kind === CommandKind.COMMAND_KIND_EXECUTE ? "execute" : "compensate";
  // One id per command answered, as the Python SDK builds it: copies of one command get
  // the same reply id, and receivers may deduplicate on it.
  const messageId = `${command.stepId}:${kind}:${command.attempt}:reply`;
  return { reply: StepReply.fromPartial(reply), messageId };
}

/** Publishes on a confirm channel and resolves once the broker confirmed. */
function publishConfirmed(channel, exchange, routingKey, body, options) {
  return new Promise((resolve, reject) => {
    channel.publish(exchange, routingKey, body, options, (error) => (error ? reject(error) : resolve()));
  });
}

async function declareTopology(channel, actions) {
  // Like the Python SDK, declare the core topology too, so that this participant may
  // start before the coordinator and still bind its queue and route its replies.
  await channel.assertExchange(COMMANDS_EXCHANGE, "topic", { durable: true });
  await channel.assertExchange(REPLIES_EXCHANGE, "direct", { durable: true });
  await channel.assertExchange(DEAD_LETTER_EXCHANGE, "fanout", { durable: true });
  await channel.assertQueue(DEAD_LETTER_QUEUE, { durable: true, arguments: { "x-queue-type": "quorum" } });
  await channel.bindQueue(DEAD_LETTER_QUEUE, DEAD_LETTER_EXCHANGE, "");
  await channel.assertQueue(REPLIES_QUEUE, { durable: true, arguments: workQueueArguments() });
  await channel.bindQueue(REPLIES_QUEUE, REPLIES_EXCHANGE, REPLIES_ROUTING_KEY);
  const queue = participantQueue(SERVICE);
  await channel.assertQueue(queue, { durable: true, arguments: workQueueArguments() });
  for (const action of actions) await channel.bindQueue(queue, COMMANDS_EXCHANGE, action);
  return queue;
}

async function main() {
  const url = process.env.SAGAPLANE_AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/";
  const prefetch = Number(process.env.SAGAPLANE_PREFETCH || 16);
  let stopping = false;
  const connection = await amqp.connect(url, { clientProperties: { connection_name: `sagaplane-participant-${SERVICE}` } });
  // A lost connection is not recovered here: exit, and let the supervisor restart us
  // (unacked commands are redelivered to the next consumer).
  connection.on("close", () => {
    if (!stopping) {
      log("connection_lost", {});
      process.exit(1);
    }
  });
  const channel = await connection.createConfirmChannel();
  await channel.prefetch(prefetch);
  const actions = [...new Set(Object.values(handlers).flatMap((byAction) => Object.keys(byAction)))];
  const queue = await declareTopology(channel, actions);
  // Replies are published with mandatory: an unroutable one comes back here (and its
  // command is acked all the same; declareTopology made the route exist).
  channel.on("return", (returned) => log("reply_returned", { messageId: returned.properties.messageId }));

  const inflight = new Set();
  const { consumerTag } = await channel.consume(
    queue,
    (message) => {
      if (message === null) return; // the broker cancelled the consumer
      const task = processMessage(channel, message).finally(() => inflight.delete(task));
      inflight.add(task);
    },
    { noAck: false },
  );
  log("ready", { queue, actions });

  const stop = async () => {
    if (stopping) return;
    stopping = true;
    await channel.cancel(consumerTag);
    await Promise.allSettled(inflight); // finish (and ack) what is in hand
    await connection.close();
    log("stopped", {});
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

async function processMessage(channel, message) {
  let command;
  try {
    command = decode(message);
  } catch (error) {
    // Never processable: reject without requeue, and the broker dead-letters it.
    log("rejected", { messageId: message.properties.messageId ?? null, reason: String(error.message) });
    channel.nack(message, false, false);
    return;
  }
  const { reply, messageId } = await handle(command);
  try {
    await publishConfirmed(channel, REPLIES_EXCHANGE, REPLIES_ROUTING_KEY, Buffer.from(StepReply.encode(reply).finish()), {
      messageId,
      correlationId: command.sagaId,
      type: REPLY_TYPE,
      contentType: CONTENT_TYPE,
      persistent: true,
      mandatory: true,
    });
  } catch (error) {
    // Unconfirmed: hand the command back; it is redelivered (up to the delivery limit).
    channel.nack(message, false, true);
    return;
  }
  channel.ack(message);
  log("handled", {
    sagaId: command.sagaId,
    stepId: command.stepId,
    action: command.action,
    kind: CommandKind[command.kind],
    attempt: command.attempt,
    outcome: ReplyOutcome[reply.outcome],
    output: reply.output ?? null,
    error: reply.error ?? null,
  });
}

if (require.main === module) {
  main().catch((error) => {
    process.stderr.write(`participant: ${error.stack ?? error}\n`);
    process.exit(1);
  });
}

module.exports = { workQueueArguments, participantQueue, handle, decode };
