//go:build tools

// Package peers pins the modules whose commands hack/peers builds.
package peers

import _ "sigs.k8s.io/cri-tools/cmd/critest"
