// Peer of bench/channels.lua: Go's unbuffered channel ping-pong between two
// goroutines. Prints the round trip in microseconds.
package main

import (
	"fmt"
	"os"
	"strconv"
	"time"
)

func main() {
	n := 1000000
	if len(os.Args) > 1 {
		n, _ = strconv.Atoi(os.Args[1])
	}
	a, b := make(chan int), make(chan int)
	go func() {
		for i := 0; i < n; i++ {
			b <- <-a
		}
	}()
	t0 := time.Now()
	for i := 0; i < n; i++ {
		a <- i
		<-b
	}
	fmt.Printf("round_trip_us %.3f\n", time.Since(t0).Seconds()/float64(n)*1e6)
}
