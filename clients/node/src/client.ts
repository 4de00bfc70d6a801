// A promise-based wrapper over the generated @grpc/grpc-js client. It adds nothing to
// the contract: every call is the RPC of the same name, and `raw` is the generated
// client for the RPCs (and call styles) this file does not wrap.
import { readFileSync } from "node:fs";
import { isIP } from "node:net";

import * as grpc from "@grpc/grpc-js";
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";

import {
  CompensateRequest,
  GetSagaRequest,
  ListActiveRequest,
  ListActiveResponse,
  SagaCoordinatorServiceClient,
  StartSagaRequest,
  StartSagasRequest,
  WatchSagaRequest,
  WatchSagaResponse,
} from "./gen/sagaplane/v1/coordinator";
import { Saga, SagaState } from "./gen/sagaplane/v1/saga";

/** A message with every field optional, as `Message.fromPartial` takes it. */
export type DeepPartial<T> = T extends Date | Uint8Array | string | number | boolean | undefined
  ? T
  : T extends Array<infer U>
    ? Array<DeepPartial<U>>
    : T extends object
      ? { [K in keyof T]?: DeepPartial<T[K]> }
      : T;

/** Where clients find the coordinator unless told: $SAGAPLANE_COORDINATOR, else 127.0.0.1:50051. */
export const DEFAULT_ADDRESS = process.env.SAGAPLANE_COORDINATOR || "127.0.0.1:50051";

/** States a saga does not leave by itself. COMPENSATION_FAILED waits for a person. */
export const END_STATES: ReadonlySet<SagaState> = new Set([
  SagaState.SAGA_STATE_COMPLETED,
  SagaState.SAGA_STATE_FAILED,
  SagaState.SAGA_STATE_COMPENSATED,
  SagaState.SAGA_STATE_COMPENSATION_FAILED,
]);

/** Options of every call: a deadline in milliseconds, and metadata (e.g. a bearer token). */
export interface CallOptions {
  timeoutMs?: number;
  metadata?: grpc.Metadata;
}

/** PEM files (paths) for a TLS channel: the CA that signed the coordinator's certificate
 * (omitted: the system's roots), and this client's certificate and key for mTLS. */
export interface TlsFiles {
  ca?: string;
  cert?: string;
  key?: string;
}

/** TLS channel credentials from PEM files (read now), for `new SagaplaneClient(address, credentials)`. */
export function tlsCredentials(files: TlsFiles = {}): grpc.ChannelCredentials {
  if ((files.cert === undefined) !== (files.key === undefined)) {
    throw new Error("a client certificate and its key go together: give both, or neither");
  }
  const read = (path?: string): Buffer | null => (path === undefined ? null : readFileSync(path));
  return grpc.credentials.createSsl(read(files.ca), read(files.key), read(files.cert));
}

/** Options of the client itself: grpc-js channel options, a bearer token sent with
 * every call (default: $SAGAPLANE_TOKEN; unset: none), and over TLS the name the
 * coordinators' certificates are checked against when it is not the address's host
 * (needed for replicas listed by different IP addresses). */
export type ClientOptions = Partial<grpc.ClientOptions> & { token?: string; serverName?: string };

/**
 * The methods repeated on UNAVAILABLE (a replica died under the call), by gRPC's retry
 * policy: the reads, and Compensate, which the coordinator answers again without a second
 * effect. Not StartSaga or StartSagas (without an idempotency key a repeat could start a
 * second saga; repeat a keyed start yourself), nor ResolveCompensation (a person's
 * decision about the step stuck now). The same as the Python client's.
 */
export const RETRIED_METHODS: readonly string[] = ["GetSaga", "ListActive", "ListSagas", "WatchSaga", "Compensate"];

/** The service config of every channel: round_robin over the addresses the target
 * resolves to (only replicas whose connection is ready get calls), and the retry policy
 * of RETRIED_METHODS (4 tries in all). */
export const SERVICE_CONFIG = JSON.stringify({
  loadBalancingConfig: [{ round_robin: {} }],
  methodConfig: [
    {
      name: RETRIED_METHODS.map((method) => ({ service: "sagaplane.v1.SagaCoordinatorService", method })),
      retryPolicy: {
        maxAttempts: 4,
        initialBackoff: "0.1s",
        maxBackoff: "1s",
        backoffMultiplier: 2,
        retryableStatusCodes: ["UNAVAILABLE"],
      },
    },
  ],
});

/** Where the client connects: grpc-js's target, and the host of each entry of a list. */
export interface CoordinatorTarget {
  target: string;
  hosts: string[];
}

/**
 * The target of `address`, in the forms of the Python client and the CLI: HOST:PORT (one
 * address), several replicas as IP:PORT,IP:PORT,... (all IPv4, or all [IPv6]:PORT;
 * grpc-js's ipv4:/ipv6: targets, whose prefix may be written), or a target URI
 * (dns:///NAME:PORT for every address of a name, unix:PATH). Throws an Error naming the
 * address for a list gRPC cannot resolve: host names (gRPC resolves one name per
 * channel), IPv4 mixed with IPv6, an entry without its port.
 */
export function coordinatorTarget(address: string): CoordinatorTarget {
  const text = address.trim();
  const refuse = (why: string): never => {
    throw new Error(`coordinator address ${JSON.stringify(address)}: ${why}`);
  };
  if (!text) refuse("empty: give HOST:PORT");
  const lowered = text.toLowerCase();
  if (["dns:", "unix:", "unix-abstract:"].some((scheme) => lowered.startsWith(scheme))) {
    if (text.includes(",")) refuse("a dns: or unix: target names one host; list replicas by IP address");
    return { target: text, hosts: [] };
  }
  let family = 0;
  let body = text;
  for (const version of [4, 6]) {
    if (lowered.startsWith(`ipv${version}:`)) [family, body] = [version, text.slice(5)];
  }
  if (!family && !text.includes(",")) return { target: text, hosts: [] };
  const entries = body.split(",").map((raw) => {
    const entry = raw.trim();
    const colon = entry.lastIndexOf(":");
    const host = colon > 0 ? entry.slice(0, colon) : "";
    const port = colon > 0 ? entry.slice(colon + 1) : "";
    if (!host) refuse(`${JSON.stringify(entry)} has no port; each address of a list is IP:PORT ([IPV6]:PORT)`);
    const bracketed = host.startsWith("[") && host.endsWith("]");
    const version = isIP(bracketed ? host.slice(1, -1) : host);
    if (!version) {
      refuse(
        `${JSON.stringify(host)} is not an IP address. gRPC resolves one host name per channel, not a list ` +
          "of them: list the replicas by IP address, give one DNS name that resolves to all of them " +
          "(dns:///coordinator.internal:50051), or put a load balancer in front",
      );
    }
    if (version === 6 && !bracketed) refuse(`write the IPv6 address ${host} in brackets, [${host}]:PORT`);
    if (!/^\d+$/.test(port) || Number(port) < 1 || Number(port) > 65535) {
      refuse(`${JSON.stringify(port)} in ${JSON.stringify(entry)} is not a port (1-65535)`);
    }
    return { version, host, port: Number(port) };
  });
  const versions = new Set(entries.map((e) => e.version));
  if (versions.size > 1) refuse("mixes IPv4 and IPv6 addresses; gRPC takes a list of one family");
  const [version] = versions;
  if (family && family !== version) refuse(`ipv${family}: lists IPv${family} addresses only`);
  return {
    target: `ipv${version}:` + entries.map((e) => `${e.host}:${e.port}`).join(","),
    hosts: entries.map((e) => e.host),
  };
}

/** The channel options for `address`: SERVICE_CONFIG (unless `given` brings its own), the
 * name TLS checks (`serverName`; for a list of replicas, its host when all share one),
 * then `given`. A TLS list of different hosts without `serverName` throws: grpc-js would
 * check every replica's certificate against the first one's host. */
function channelOptions(
  address: CoordinatorTarget,
  secure: boolean,
  serverName: string | undefined,
  given: Partial<grpc.ClientOptions>,
): Partial<grpc.ClientOptions> {
  const options: Partial<grpc.ClientOptions> = {};
  if (!("grpc.service_config" in given) && !("grpc.lb_policy_name" in given)) {
    options["grpc.service_config"] = SERVICE_CONFIG;
  }
  const hosts = new Set(address.hosts);
  if (secure && !serverName && hosts.size > 1) {
    throw new Error(
      `coordinator address ${address.target}: over TLS, every replica's certificate is checked against ` +
        "one name: give the name the replicas' certificates carry (options.serverName)",
    );
  }
  // grpc-js checks a TLS certificate against the target's host (a list's first one) or
  // against this override; grpc.default_authority only changes the :authority header.
  if (serverName) {
    options["grpc.ssl_target_name_override"] = serverName;
    options["grpc.default_authority"] = serverName;
  }
  return { ...options, ...given };
}

type Unary<Req, Res> = (
  request: Req,
  metadata: grpc.Metadata,
  options: Partial<grpc.CallOptions>,
  callback: (error: grpc.ServiceError | null, response: Res) => void,
) => grpc.ClientUnaryCall;

export class SagaplaneClient {
  /** The generated client (every RPC, callback style). */
  readonly raw: SagaCoordinatorServiceClient;

  private readonly token: string | undefined;

  /**
   * A client of the coordinator at `address` (see coordinatorTarget: one HOST:PORT, or
   * several replicas as IP:PORT,IP:PORT,..., or dns:///NAME:PORT). Calls are spread over
   * the replicas whose connection is ready, and RETRIED_METHODS are repeated on
   * UNAVAILABLE; starts are not (repeat a start with an idempotency key yourself).
   */
  constructor(
    address: string = DEFAULT_ADDRESS,
    credentials: grpc.ChannelCredentials = grpc.credentials.createInsecure(),
    options: ClientOptions = {},
  ) {
    const { token, serverName, ...given } = options;
    this.token = token ?? (process.env.SAGAPLANE_TOKEN || undefined);
    const target = coordinatorTarget(address);
    const channel = channelOptions(target, credentials._isSecure(), serverName, given);
    this.raw = new SagaCoordinatorServiceClient(target.target, credentials, channel);
  }

  /** StartSaga; resolves to the saga as recorded. Rejects with a grpc.ServiceError. */
  async startSaga(request: DeepPartial<StartSagaRequest>, options?: CallOptions): Promise<Saga> {
    const response = await this.call(this.raw.startSaga, StartSagaRequest.fromPartial(request), options);
    return response.saga!;
  }

  /**
   * StartSagas: up to 1000 sagas in one call and one transaction, all or none; resolves
   * to the sagas in the order given. A bad saga rejects the whole call with
   * INVALID_ARGUMENT; `fieldViolations(error)` then names each bad saga's first bad field
   * (`index` is its position).
   */
  async startSagas(sagas: Array<DeepPartial<StartSagaRequest>>, options?: CallOptions): Promise<Saga[]> {
    const response = await this.call(this.raw.startSagas, StartSagasRequest.fromPartial({ sagas }), options);
    return response.sagas;
  }

  /** GetSaga; NOT_FOUND rejects. */
  async getSaga(id: string, options?: CallOptions & { includeHistory?: boolean }): Promise<Saga> {
    const request = GetSagaRequest.fromPartial({ id, includeHistory: options?.includeHistory ?? false });
    return (await this.call(this.raw.getSaga, request, options)).saga!;
  }

  /** Compensate; resolves to the saga after the request was recorded. */
  async compensate(id: string, reason = "", options?: CallOptions): Promise<Saga> {
    return (await this.call(this.raw.compensate, CompensateRequest.fromPartial({ id, reason }), options)).saga!;
  }

  /** ListActive: one page (pass `nextPageToken` back as `pageToken` for the next). */
  listActive(request: DeepPartial<ListActiveRequest> = {}, options?: CallOptions): Promise<ListActiveResponse> {
    return this.call(this.raw.listActive, ListActiveRequest.fromPartial(request), options);
  }

  /**
   * Follows the saga over the WatchSaga stream (the coordinator pushes each commit; no
   * polling) until it is in one of END_STATES, and resolves to it. Rejects with the
   * stream's grpc.ServiceError (NOT_FOUND for an unknown saga), or when `timeoutMs`
   * (default 60 s) passes first.
   */
  waitForEnd(id: string, options: { timeoutMs?: number; metadata?: grpc.Metadata } = {}): Promise<Saga> {
    const timeoutMs = options.timeoutMs ?? 60_000;
    return new Promise((resolve, reject) => {
      const call = this.raw.watchSaga(WatchSagaRequest.fromPartial({ id }), this.metadata(options.metadata));
      let last: Saga | undefined;
      let settled = false;
      const settle = (outcome: () => void): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        call.cancel(); // a no-op once the stream ended; its CANCELLED error is ignored
        outcome();
      };
      const timer = setTimeout(() => {
        const state = last ? SagaState[last.state] : "unknown";
        settle(() => reject(new Error(`saga ${id} still ${state} after ${timeoutMs} ms`)));
      }, timeoutMs);
      call.on("data", (message: WatchSagaResponse) => {
        last = message.saga;
        if (last && END_STATES.has(last.state)) settle(() => resolve(last!));
      });
      call.on("error", (error: grpc.ServiceError) => settle(() => reject(error)));
      call.on("end", () =>
        settle(() => (last ? resolve(last) : reject(new Error(`the watch of saga ${id} ended without a saga`)))),
      );
    });
  }

  /** Closes the channel. Safe to call twice. */
  close(): void {
    this.raw.close();
  }

  /** The call's metadata, with `authorization: Bearer <token>` when the client has a
   * token (and the caller's metadata does not say otherwise). */
  private metadata(given?: grpc.Metadata): grpc.Metadata {
    const metadata = given ? given.clone() : new grpc.Metadata();
    if (this.token && metadata.get("authorization").length === 0) {
      metadata.set("authorization", `Bearer ${this.token}`);
    }
    return metadata;
  }

  private call<Req, Res>(method: Unary<Req, Res>, request: Req, options?: CallOptions): Promise<Res> {
    const callOptions: Partial<grpc.CallOptions> = {};
    if (options?.timeoutMs !== undefined) callOptions.deadline = Date.now() + options.timeoutMs;
    return new Promise((resolve, reject) => {
      method.call(this.raw, request, this.metadata(options?.metadata), callOptions, (error, response) =>
        error ? reject(error) : resolve(response),
      );
    });
  }
}

/** One bad field of a refused request: a google.rpc.BadRequest field violation. */
export interface FieldViolation {
  /** Its path in the request, e.g. `sagas[17].steps[0].action`. */
  field: string;
  /** What is wrong with it, e.g. `is required`. */
  description: string;
  /** The saga's position in a StartSagas call (17 for `sagas[17]...`); undefined otherwise. */
  index?: number;
}

const STATUS_DETAILS = "grpc-status-details-bin";
const BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest";

/**
 * The field violations of a failed call: the google.rpc.BadRequest details of gRPC's
 * rich error model (the `grpc-status-details-bin` trailer), which the coordinator sends
 * with every INVALID_ARGUMENT (and with a StartSagas ALREADY_EXISTS). Empty when there
 * are none. The few fields of google.rpc.Status, Any and BadRequest are read here with
 * the wire reader the generated code uses, rather than generating all of googleapis.
 */
export function fieldViolations(error: unknown): FieldViolation[] {
  const metadata = (error as { metadata?: grpc.Metadata }).metadata;
  const found: FieldViolation[] = [];
  for (const value of metadata?.get(STATUS_DETAILS) ?? []) {
    if (typeof value === "string") continue;
    // google.rpc.Status: 3 = repeated google.protobuf.Any details.
    for (const any of fields(value, 3)) {
      const [typeUrl] = fields(any, 1);
      const [bytes] = fields(any, 2);
      if (!typeUrl || !bytes || utf8.decode(typeUrl) !== BAD_REQUEST) continue;
      // google.rpc.BadRequest: 1 = repeated FieldViolation {1 = field, 2 = description}.
      for (const violation of fields(bytes, 1)) {
        const field = utf8.decode(fields(violation, 1)[0] ?? new Uint8Array());
        const description = utf8.decode(fields(violation, 2)[0] ?? new Uint8Array());
        const index = /^\w+\[(\d+)\]/.exec(field);
        found.push(index ? { field, description, index: Number(index[1]) } : { field, description });
      }
    }
  }
  return found;
}

const utf8 = new TextDecoder();

/** The contents of every length-delimited field `number` of a message. */
function fields(message: Uint8Array, number: number): Uint8Array[] {
  const reader = new BinaryReader(message);
  const found: Uint8Array[] = [];
  while (reader.pos < reader.len) {
    const [fieldNo, wireType] = reader.tag();
    if (fieldNo === number && wireType === WireType.LengthDelimited) found.push(reader.bytes());
    else reader.skip(wireType);
  }
  return found;
}
