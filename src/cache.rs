//! moka caches the hot path reads (gateway keys, catalog, provider keys) and their invalidation.

/// The caches; every management write that touches an entry invalidates it.
#[derive(Clone, Default)]
pub struct Caches {}

impl Caches {
    pub fn new() -> Self {
        Self {}
    }

    /// A user's status, role or limits changed: drop everything derived from that user.
    pub async fn invalidate_user(&self, _user_id: &str) {}
}
