//! What the XDP test files (`xdp_attach.rs`, `xdp_guard.rs`) share beyond the workspace test
//! kit (`gateway-test-support`): the root check that also demands the embedded program.

/// True when the test may touch the kernel (root; see `gateway_test_support::privileged`:
/// a visible SKIPPED line otherwise, a panic under `CI=true`). As root, the binary must
/// carry the XDP program: one built with `AYA_BUILD_SKIP` would fail every test obscurely.
pub fn privileged(test: &str) -> bool {
    let root = gateway_test_support::privileged(test, "CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN");
    assert!(
        !root || gateway::xdp::program_embedded(),
        "{test}: built with AYA_BUILD_SKIP, so there is no XDP program; rebuild without it"
    );
    root
}
