// The public surface of @sagaplane/client: the generated messages and gRPC client of
// sagaplane.v1 (src/gen, written by scripts/generate; never edit it), plus a thin
// promise-based wrapper (src/client.ts).
export * from "./gen/sagaplane/v1/saga";
export * from "./gen/sagaplane/v1/coordinator";
export * from "./gen/sagaplane/v1/messages";
export * from "./client";
