// Starts an order saga (one step in the Python shop's orders service, one in the
// Node.js shipping participant of examples/node-participant), reads it back, lists the
// active sagas, then either compensates it (--compensate) or waits for its end (--wait).
//
//   npm run build && node dist/examples/quickstart.js [--address HOST:PORT] [--wait SECONDS] [--compensate]
//       [--tls-ca ca.pem [--tls-cert client.pem --tls-key client.key]] [--token TOKEN]
//
// --tls-ca connects over TLS (with --tls-cert/--tls-key: mTLS); the token (default
// $SAGAPLANE_TOKEN) goes with every call as `authorization: Bearer TOKEN`.
// Prints one JSON object per line: {"op": "start" | "get" | "list" | "compensate" | "end", ...},
// sagas in the protobuf JSON mapping (the same JSON that grpcurl shows).
import { randomUUID } from "node:crypto";

import * as grpc from "@grpc/grpc-js";

import { DEFAULT_ADDRESS, Saga, SagaState, SagaplaneClient, TlsFiles, tlsCredentials } from "../src";

interface Args {
  address: string;
  waitSeconds?: number;
  compensate: boolean;
  tls: TlsFiles;
  token?: string;
}

function parseArgs(argv: string[]): Args {
  const args: Args = { address: DEFAULT_ADDRESS, compensate: false, tls: {} };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--address") args.address = argv[++i];
    else if (arg === "--wait") args.waitSeconds = Number(argv[++i]);
    else if (arg === "--compensate") args.compensate = true;
    else if (arg === "--tls-ca") args.tls.ca = argv[++i];
    else if (arg === "--tls-cert") args.tls.cert = argv[++i];
    else if (arg === "--tls-key") args.tls.key = argv[++i];
    else if (arg === "--token") args.token = argv[++i];
    else throw new Error(`unknown argument ${arg}`);
  }
  return args;
}

function print(op: string, fields: Record<string, unknown>): void {
  process.stdout.write(JSON.stringify({ op, ...fields }) + "\n");
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const tls = args.tls.ca !== undefined || args.tls.cert !== undefined;
  const credentials = tls ? tlsCredentials(args.tls) : grpc.credentials.createInsecure();
  const client = new SagaplaneClient(args.address, credentials, { token: args.token });
  try {
    const started = await client.startSaga({
      name: "order.ship",
      // Optional, but what a real caller does: a retried request returns the same saga.
      idempotencyKey: `quickstart-${randomUUID()}`,
      context: { customer: "c-1", source: "node" },
      steps: [
        { name: "create", action: "orders.create", compensation: "orders.delete", input: { sku: "book", qty: 1 } },
        {
          name: "ship",
          action: "shipping.schedule",
          compensation: "shipping.cancel",
          // After create (as the step before it, but said outright); the coordinator
          // replaces the reference by the order id create returned when it sends ship.
          dependsOn: ["create"],
          input: { address: "1 Main St", sku: "book", order_id: "${steps.create.output.order_id}" },
        },
      ],
    });
    print("start", { saga: Saga.toJSON(started) });

    const fetched = await client.getSaga(started.id, { includeHistory: true });
    print("get", { saga: Saga.toJSON(fetched) });

    const active = await client.listActive({ pageSize: 100 });
    print("list", { sagaIds: active.sagas.map((s) => s.id), nextPageToken: active.nextPageToken });

    if (args.compensate) {
      const compensating = await client.compensate(started.id, "quickstart: --compensate");
      print("compensate", { saga: Saga.toJSON(compensating) });
    }
    if (args.waitSeconds !== undefined) {
      const ended = await client.waitForEnd(started.id, { timeoutMs: args.waitSeconds * 1000 });
      print("end", { saga: Saga.toJSON(ended), state: SagaState[ended.state] });
    }
  } finally {
    client.close();
  }
}

main().catch((error: unknown) => {
  // A grpc.ServiceError carries the status code and the coordinator's message.
  const e = error as { code?: number; details?: string; message?: string };
  process.stderr.write(`quickstart: ${e.details ?? e.message ?? String(error)} (code ${e.code ?? "-"})\n`);
  process.exit(1);
});
