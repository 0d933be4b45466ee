//! Small things every layer uses: the coarse clock, the fast hash map, the process's
//! resource budget (descriptor reserve, buffer caps, rate-limited refusal logs), and giving
//! freed heap memory back to the kernel.

pub mod budget;
pub mod clock;
pub(crate) mod fasthash;
pub mod memory;
