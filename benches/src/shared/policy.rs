//! The `--policy` argument shared by the cache benchmarks (included with `#[path]`).

use clap::ValueEnum;
use flashcache_core::policy::PolicyKind;

/// The replacement policy (`--policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    /// FIFO.
    Fifo,
    /// LRU.
    Lru,
    /// flashcache's segmented LRU.
    Slru,
    /// SIEVE.
    Sieve,
}

impl Policy {
    /// The policy core's kind for this choice.
    pub fn kind(self) -> PolicyKind {
        match self {
            Policy::Fifo => PolicyKind::Fifo,
            Policy::Lru => PolicyKind::Lru,
            Policy::Slru => PolicyKind::FLASHCACHE_LRU,
            Policy::Sieve => PolicyKind::Sieve,
        }
    }

    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Fifo => "fifo",
            Policy::Lru => "lru",
            Policy::Slru => "slru",
            Policy::Sieve => "sieve",
        }
    }
}
