//! Library target of the eBPF package; intentionally empty.
//!
//! It exists so `gateway` can list this package as a build-dependency (aya-template's
//! pattern), which makes cargo rebuild the gateway, and so re-embed the kernel object,
//! when this package changes. The XDP program itself is `src/main.rs`.
#![no_std]
