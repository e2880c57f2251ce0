// Command cri-caller calls a CRI endpoint through grpc-go, the gRPC library kubelet uses, with
// kubelet's dial options. The contract tests drive it: grpc-go's HTTP/2 client indexes headers
// in HPACK's dynamic table, grows its flow-control windows from BDP pings and cancels with
// RST_STREAM, none of which Rust's h2 client does the same way.
//
// Each line on standard input is a round: a JSON array of calls, all made at once on the one
// connection. For each round one line is written: a JSON array with, for each call of the
// round, the results of its copies in order.
package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// kubelet's limit for CRI messages, both ways.
const maxMessageSize = 16 * 1024 * 1024

// call is one entry of a round.
type call struct {
	Method string `json:"method"`
	// Request is the message, in hex.
	Request string `json:"request"`
	// Times is how many copies of the call run at once; 0 counts as 1.
	Times int `json:"times"`
	// Sends, when set, makes the call a bidirectional stream that sends Request that many
	// times before closing its side; ServerStream makes it a server stream.
	Sends        int  `json:"sends"`
	ServerStream bool `json:"server_stream"`
	// TimeoutMs is the call's deadline, which grpc-go sends as grpc-timeout.
	TimeoutMs int `json:"timeout_ms"`
	// Keep asks for the messages themselves, in hex, besides their hashes.
	Keep bool `json:"keep"`
	// LoopMs, when set, makes each copy repeat the unary call for that long, one call after
	// another, for the benchmarks: its result is then the first failure, or the latencies.
	LoopMs int `json:"loop_ms"`
}

type message struct {
	Len    int    `json:"len"`
	Digest string `json:"digest"`
	Data   string `json:"data,omitempty"`
}

type result struct {
	Code     uint32    `json:"code"`
	Message  string    `json:"message"`
	Messages []message `json:"messages,omitempty"`
	// Each call's latency in microseconds, for LoopMs.
	LatenciesUs []float64 `json:"latencies_us,omitempty"`
}

// rawCodec passes messages through as bytes: the tests build and check them.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	b, ok := v.(*[]byte)
	if !ok {
		return nil, fmt.Errorf("rawCodec: %T is not *[]byte", v)
	}
	return *b, nil
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	b, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec: %T is not *[]byte", v)
	}
	*b = append((*b)[:0], data...)
	return nil
}

// Name is empty so that grpc-go sends `content-type: application/grpc`, as kubelet's client
// does (a named codec makes it `application/grpc+NAME`). CRI-O's socket only takes HTTP/2
// connections whose first request says exactly `application/grpc` (its cmux matcher) and resets
// the others.
func (rawCodec) Name() string { return "" }

func describe(data []byte, keep bool) message {
	sum := sha256.Sum256(data)
	m := message{Len: len(data), Digest: "sha256:" + hex.EncodeToString(sum[:])}
	if keep {
		m.Data = hex.EncodeToString(data)
	}
	return m
}

func run(conn *grpc.ClientConn, c call) result {
	request, err := hex.DecodeString(c.Request)
	if err != nil {
		return result{Code: uint32(codes.InvalidArgument), Message: "cri-caller: request is not hex: " + err.Error()}
	}
	if c.LoopMs > 0 {
		return loop(conn, c, request)
	}
	ctx := context.Background()
	if c.TimeoutMs > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(c.TimeoutMs)*time.Millisecond)
		defer cancel()
	}
	codec := grpc.ForceCodec(rawCodec{})
	var out result
	if c.Sends == 0 && !c.ServerStream {
		var response []byte
		err = conn.Invoke(ctx, c.Method, &request, &response, codec)
		if err == nil {
			out.Messages = append(out.Messages, describe(response, c.Keep))
		}
	} else {
		desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: c.Sends > 0}
		var stream grpc.ClientStream
		stream, err = conn.NewStream(ctx, desc, c.Method, codec)
		if err == nil {
			err = streamCall(stream, request, c.Sends, c.Keep, &out)
		}
	}
	s := status.Convert(err)
	out.Code = uint32(s.Code())
	out.Message = s.Message()
	return out
}

func loop(conn *grpc.ClientConn, c call, request []byte) result {
	var out result
	codec := grpc.ForceCodec(rawCodec{})
	var response []byte
	deadline := time.Now().Add(time.Duration(c.LoopMs) * time.Millisecond)
	for time.Now().Before(deadline) {
		started := time.Now()
		if err := conn.Invoke(context.Background(), c.Method, &request, &response, codec); err != nil {
			s := status.Convert(err)
			out.Code = uint32(s.Code())
			out.Message = s.Message()
			return out
		}
		out.LatenciesUs = append(out.LatenciesUs, float64(time.Since(started).Nanoseconds())/1e3)
	}
	return out
}

func streamCall(stream grpc.ClientStream, request []byte, sends int, keep bool, out *result) error {
	if sends == 0 {
		sends = 1
	}
	// Sent while the answers are read: an echo that is not read stops the sends in turn.
	sent := make(chan error, 1)
	go func() {
		for i := 0; i < sends; i++ {
			if err := stream.SendMsg(&request); err != nil {
				sent <- nil // the status comes from RecvMsg
				return
			}
		}
		sent <- stream.CloseSend()
	}()
	for {
		var response []byte
		err := stream.RecvMsg(&response)
		if err == io.EOF {
			return <-sent
		}
		if err != nil {
			return err
		}
		out.Messages = append(out.Messages, describe(response, keep))
	}
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: cri-caller SOCKET < rounds")
		os.Exit(2)
	}
	socket := os.Args[1]
	// As kubelet dials its CRI endpoints.
	dialer := func(ctx context.Context, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", socket)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	conn, err := grpc.DialContext(ctx, socket,
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithAuthority("localhost"),
		grpc.WithContextDialer(dialer),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(maxMessageSize),
			grpc.MaxCallSendMsgSize(maxMessageSize),
		),
	)
	cancel()
	if err != nil {
		fmt.Fprintf(os.Stderr, "cri-caller: dialing %s: %v\n", socket, err)
		os.Exit(1)
	}
	defer conn.Close()

	input := bufio.NewScanner(os.Stdin)
	input.Buffer(make([]byte, 64*1024), 64*1024*1024)
	output := json.NewEncoder(os.Stdout)
	for input.Scan() {
		var round []call
		if err := json.Unmarshal(input.Bytes(), &round); err != nil {
			fmt.Fprintf(os.Stderr, "cri-caller: reading a round: %v\n", err)
			os.Exit(2)
		}
		results := make([][]result, len(round))
		var wg sync.WaitGroup
		for i, c := range round {
			times := c.Times
			if times == 0 {
				times = 1
			}
			results[i] = make([]result, times)
			for j := 0; j < times; j++ {
				wg.Add(1)
				go func(i, j int, c call) {
					defer wg.Done()
					results[i][j] = run(conn, c)
				}(i, j, c)
			}
		}
		wg.Wait()
		if err := output.Encode(results); err != nil {
			fmt.Fprintf(os.Stderr, "cri-caller: writing results: %v\n", err)
			os.Exit(1)
		}
	}
	if err := input.Err(); err != nil {
		fmt.Fprintf(os.Stderr, "cri-caller: reading standard input: %v\n", err)
		os.Exit(1)
	}
}
