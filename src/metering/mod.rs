//! Metering, one concern above `store/`: the usage event and its cost arithmetic, the token
//! estimate for upstreams that report none, the reservation leases, and the batch writer. The
//! proxy's meter stage feeds it; it calls `store/` for its queries.

pub mod estimate;
pub mod event;
pub mod leases;
pub mod spool;
pub mod writer;
