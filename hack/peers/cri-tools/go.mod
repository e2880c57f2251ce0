// critest is a Ginkgo suite: it is built with `go test -c` from cri-tools' module, which needs
// a module of our own that requires it.
module nix-cri.local/peers/cri-tools

go 1.26.6

require sigs.k8s.io/cri-tools v1.37.0
