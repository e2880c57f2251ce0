//go:build tools

// Package peers pins the modules whose commands hack/peers builds.
package peers

import _ "github.com/cri-o/cri-o/cmd/crio"
