//! Small things every layer uses: the coarse clock, the fast hash map, and the process's
//! resource budget (descriptor reserve, buffer caps, rate-limited refusal logs).

pub mod budget;
pub mod clock;
pub(crate) mod fasthash;
