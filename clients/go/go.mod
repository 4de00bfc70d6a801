module github.com/sagaplane/sagaplane/clients/go

// The oldest versions the generated code is known to build with (Debian bookworm's:
// Go 1.19, grpc-go 1.33.3, protobuf-go 1.28.1); newer ones work too. The repository
// ships no go.sum (it is built offline, in GOPATH mode): run `go mod tidy` once.
go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
