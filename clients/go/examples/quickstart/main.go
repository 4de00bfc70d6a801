// Command quickstart starts an order saga (one step in the Python shop's orders
// service, one in the Node.js shipping participant of examples/node-participant),
// reads it back, lists the active sagas, then compensates it (-compensate) and/or
// waits for its end (-wait).
//
//	go run ./examples/quickstart [-address HOST:PORT] [-wait 30s] [-compensate]
//	    [-tls-ca ca.pem [-tls-cert client.pem -tls-key client.key]] [-token TOKEN]
//
// -tls-ca connects over TLS (with -tls-cert/-tls-key: mTLS); the token (default
// $SAGAPLANE_TOKEN) goes with every call as "authorization: Bearer TOKEN".
//
// It prints one JSON object per line: {"op": "start" | "get" | "list" | "compensate" |
// "end", ...}, sagas in the protobuf JSON mapping (the same JSON grpcurl shows).
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/ioutil"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	sagaplanev1 "github.com/sagaplane/sagaplane/clients/go/sagaplane/v1"
)

// endStates are the states a saga does not leave by itself (COMPENSATION_FAILED waits
// for a person).
var endStates = map[sagaplanev1.SagaState]bool{
	sagaplanev1.SagaState_SAGA_STATE_COMPLETED:           true,
	sagaplanev1.SagaState_SAGA_STATE_FAILED:              true,
	sagaplanev1.SagaState_SAGA_STATE_COMPENSATED:         true,
	sagaplanev1.SagaState_SAGA_STATE_COMPENSATION_FAILED: true,
}

func main() {
	defaultAddress := os.Getenv("SAGAPLANE_COORDINATOR")
	if defaultAddress == "" {
		defaultAddress = "127.0.0.1:50051"
	}
	address := flag.String("address", defaultAddress, "the coordinator's host:port ($SAGAPLANE_COORDINATOR)")
	wait := flag.Duration("wait", 0, "wait this long for the saga to end (0: do not wait)")
	compensate := flag.Bool("compensate", false, "compensate the saga after listing")
	tlsCA := flag.String("tls-ca", "", "connect over TLS, trusting this PEM CA")
	tlsCert := flag.String("tls-cert", "", "present this PEM client certificate (mTLS; with -tls-ca)")
	tlsKey := flag.String("tls-key", "", "the private key of -tls-cert")
	token := flag.String("token", os.Getenv("SAGAPLANE_TOKEN"), "bearer token sent with every call ($SAGAPLANE_TOKEN)")
	flag.Parse()
	transport, err := transportOption(*tlsCA, *tlsCert, *tlsKey)
	if err == nil {
		err = run(*address, transport, *token, *wait, *compensate)
	}
	if err != nil {
		// A gRPC error prints as "rpc error: code = NotFound desc = ...".
		fmt.Fprintln(os.Stderr, "quickstart:", err)
		os.Exit(1)
	}
}

// transportOption is TLS when a CA is given (with a client certificate: mTLS), else
// plaintext, as the coordinator listens by default. (WithInsecure exists in every
// grpc-go version; newer code may prefer credentials/insecure.NewCredentials().)
func transportOption(caFile, certFile, keyFile string) (grpc.DialOption, error) {
	if caFile == "" {
		if certFile != "" || keyFile != "" {
			return nil, errors.New("-tls-cert and -tls-key need -tls-ca")
		}
		return grpc.WithInsecure(), nil
	}
	pem, err := ioutil.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s holds no PEM certificate", caFile)
	}
	config := &tls.Config{RootCAs: roots}
	if certFile != "" || keyFile != "" {
		pair, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return grpc.WithTransportCredentials(credentials.NewTLS(config)), nil
}

func run(address string, transport grpc.DialOption, token string, wait time.Duration, compensate bool) error {
	ctx := context.Background()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	conn, err := grpc.Dial(address, transport)
	if err != nil {
		return err
	}
	defer conn.Close()
	client := sagaplanev1.NewSagaCoordinatorServiceClient(conn)

	request, err := orderRequest()
	if err != nil {
		return err
	}
	started, err := client.StartSaga(ctx, request)
	if err != nil {
		return err
	}
	id := started.GetSaga().GetId()
	if err := print("start", "saga", started.GetSaga()); err != nil {
		return err
	}

	got, err := client.GetSaga(ctx, &sagaplanev1.GetSagaRequest{Id: id, IncludeHistory: true})
	if err != nil {
		return err
	}
	if err := print("get", "saga", got.GetSaga()); err != nil {
		return err
	}

	active, err := client.ListActive(ctx, &sagaplanev1.ListActiveRequest{PageSize: 100})
	if err != nil {
		return err
	}
	ids := []string{}
	for _, saga := range active.GetSagas() {
		ids = append(ids, saga.GetId())
	}
	if err := printJSON(map[string]interface{}{"op": "list", "sagaIds": ids, "nextPageToken": active.GetNextPageToken()}); err != nil {
		return err
	}

	if compensate {
		compensated, err := client.Compensate(ctx, &sagaplanev1.CompensateRequest{Id: id, Reason: "quickstart: -compensate"})
		if err != nil {
			return err
		}
		if err := print("compensate", "saga", compensated.GetSaga()); err != nil {
			return err
		}
	}
	if wait > 0 {
		ended, err := waitForEnd(ctx, client, id, wait)
		if err != nil {
			return err
		}
		return print("end", "saga", ended)
	}
	return nil
}

func orderRequest() (*sagaplanev1.StartSagaRequest, error) {
	// JSON objects travel as google.protobuf.Struct; structpb builds one from a map.
	context, err := structpb.NewStruct(map[string]interface{}{"customer": "c-1", "source": "go"})
	if err != nil {
		return nil, err
	}
	createInput, err := structpb.NewStruct(map[string]interface{}{"sku": "book", "qty": 1})
	if err != nil {
		return nil, err
	}
	// The coordinator replaces the reference by the order id create returned when it
	// sends ship.
	shipInput, err := structpb.NewStruct(map[string]interface{}{
		"address": "1 Main St", "sku": "book", "order_id": "${steps.create.output.order_id}",
	})
	if err != nil {
		return nil, err
	}
	key := make([]byte, 8)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	return &sagaplanev1.StartSagaRequest{
		Name: "order.ship",
		// Optional, but what a real caller does: a retried request returns the same saga.
		IdempotencyKey: "quickstart-" + hex.EncodeToString(key),
		Context:        context,
		Steps: []*sagaplanev1.StepSpec{
			{Name: "create", Action: "orders.create", Compensation: "orders.delete", Input: createInput},
			// DependsOn: after create (as the step before it, but said outright).
			{Name: "ship", Action: "shipping.schedule", Compensation: "shipping.cancel", DependsOn: []string{"create"}, Input: shipInput},
		},
	}, nil
}

// waitForEnd polls GetSaga until the saga is in an end state, or fails after timeout.
func waitForEnd(ctx context.Context, client sagaplanev1.SagaCoordinatorServiceClient, id string, timeout time.Duration) (*sagaplanev1.Saga, error) {
	deadline := time.Now().Add(timeout)
	for {
		got, err := client.GetSaga(ctx, &sagaplanev1.GetSagaRequest{Id: id})
		if err != nil {
			return nil, err
		}
		if endStates[got.GetSaga().GetState()] {
			return got.GetSaga(), nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("saga %s still %s after %s", id, got.GetSaga().GetState(), timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// print writes {"op": op, key: message} as one line, the message in protobuf JSON.
func print(op, key string, message proto.Message) error {
	raw, err := protojson.Marshal(message)
	if err != nil {
		return err
	}
	return printJSON(map[string]interface{}{"op": op, key: json.RawMessage(raw)})
}

func printJSON(value interface{}) error {
	line, err := json.Marshal(value)
	if err != nil {
		return err
	}
	_, err = fmt.Println(string(line))
	return err
}
