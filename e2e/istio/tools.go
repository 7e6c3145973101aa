//go:build tools

// Package istio pins Istio's own binaries, built from the istio.io/istio Go
// module as real test peers (pilot-agent as an injected sidecar's agent,
// pilot-discovery as istiod): e2e/istio/build.sh builds them. None of
// Istio's code is part of meshpilot; this module only names what to build.
package istio

import (
	_ "istio.io/istio/pilot/cmd/pilot-agent"
	_ "istio.io/istio/pilot/cmd/pilot-discovery"
)
