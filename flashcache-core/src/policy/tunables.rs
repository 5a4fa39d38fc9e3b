//! flashcache's tunables, with their ranges, settable by name.

use std::fmt;

/// A tunable could not be set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TunableError {
    /// No tunable has this name.
    #[error("no tunable named {0:?} (known: {known})", known = Tunables::NAMES.join(", "))]
    Unknown(String),
    /// The value is outside the tunable's range.
    #[error("{name} = {value} is out of range ({min}..={max})")]
    OutOfRange {
        /// The tunable.
        name: &'static str,
        /// The value given.
        value: u64,
        /// The smallest allowed.
        min: u64,
        /// The largest allowed.
        max: u64,
    },
}

macro_rules! tunables {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty = $default:expr, $min:expr, $max:expr; )*) => {
        /// The cache's tunables (flashcache's `dev.flashcache.<ssd>+<disk>.*`
        /// sysctls that apply here), each with its range. Change them with
        /// [`set`](Self::set) by flashcache's name; the I/O layer applies a new
        /// value from the next decision on.
        ///
        /// ```
        /// use flashcache_core::policy::Tunables;
        /// let mut t = Tunables::default();
        /// assert_eq!(t.dirty_thresh_pct, 20);
        /// t.set("dirty_thresh_pct", 40).unwrap();
        /// assert_eq!(t.dirty_thresh_blocks(512), 204);
        /// assert!(t.set("dirty_thresh_pct", 99).is_err()); // 10..=95
        /// assert!(t.set("no_such_thing", 1).is_err());
        /// ```
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct Tunables {
            $( $(#[$doc])* pub $name: $ty, )*
        }

        impl Default for Tunables {
            fn default() -> Self {
                Tunables { $( $name: $default, )* }
            }
        }

        impl Tunables {
            /// Every tunable's name, in a fixed order.
            pub const NAMES: &'static [&'static str] = &[ $( stringify!($name), )* ];

            /// Sets the tunable `name` to `value`, if it is within range.
            pub fn set(&mut self, name: &str, value: u64) -> Result<(), TunableError> {
                match name {
                    $( stringify!($name) => {
                        let (min, max) = ($min as u64, $max as u64);
                        if value < min || value > max {
                            return Err(TunableError::OutOfRange {
                                name: stringify!($name), value, min, max,
                            });
                        }
                        self.$name = value as $ty;
                        Ok(())
                    } )*
                    _ => Err(TunableError::Unknown(name.to_string())),
                }
            }

            /// The value of the tunable `name`.
            pub fn get(&self, name: &str) -> Option<u64> {
                match name {
                    $( stringify!($name) => Some(self.$name as u64), )*
                    _ => None,
                }
            }

            /// The range of the tunable `name`.
            pub fn range(name: &str) -> Option<(u64, u64)> {
                match name {
                    $( stringify!($name) => Some(($min as u64, $max as u64)), )*
                    _ => None,
                }
            }

            /// Every tunable as `(name, value)`.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name as u64), )* ]
            }
        }
    };
}

tunables! {
    /// Dirty blocks a set may hold, in percent of its blocks, before it is
    /// cleaned (writeback).
    dirty_thresh_pct: u32 = 20, 10, 95;
    /// Seconds a block must stay untouched for one fallow period; 0 turns idle
    /// cleaning off (writeback).
    fallow_delay: u32 = 900, 0, 86_400;
    /// Idle dirty blocks cleaned per set per second (writeback).
    fallow_clean_speed: u32 = 2, 1, 100;
    /// Cleaning writes in flight per set (writeback).
    max_clean_ios_set: u32 = 2, 1, 64;
    /// Cleaning writes in flight in all (writeback).
    max_clean_ios_total: u32 = 4, 1, 1024;
    /// Clean at least one block of a set that a read miss finds full of dirty
    /// blocks (writeback).
    clean_on_read_miss: u32 = 0, 0, 1;
    /// The same for write misses (writeback).
    clean_on_write_miss: u32 = 0, 0, 1;
    /// Replacement policy: 0 FIFO, 1 segmented LRU (flashcache's "LRU"), 2 LRU,
    /// 3 SIEVE.
    reclaim_policy: u32 = 3, 0, 3;
    /// Segmented LRU: warm hits before a block is promoted to hot.
    lru_promote_thresh: u32 = 2, 1, 127;
    /// Segmented LRU: the hot list's share of a set, in percent.
    lru_hot_pct: u32 = 75, 0, 100;
    /// Sequential streams longer than this many KiB bypass the cache; 0 = off.
    skip_seq_thresh_kb: u32 = 0, 0, 1_048_576;
    /// 1: cache every I/O not marked "do not cache"; 0: cache only I/O marked
    /// "cache" (replaces flashcache's pid lists).
    cache_all: u32 = 1, 0, 1;
    /// 1: a shutdown keeps dirty blocks instead of cleaning them first
    /// (writeback).
    fast_remove: u32 = 0, 0, 1;
    /// SSD errors before a writethrough or writearound cache goes to bypass.
    ssd_error_threshold: u32 = 1, 1, 1_000_000;
}

impl Tunables {
    /// A set's dirty threshold in blocks (flashcache's `dirty_thresh_set`).
    pub fn dirty_thresh_blocks(&self, assoc: u32) -> u32 {
        (u64::from(assoc) * u64::from(self.dirty_thresh_pct) / 100) as u32
    }

    /// The replacement policy `reclaim_policy` names, with the segmented LRU's
    /// parameters.
    pub fn policy(&self) -> super::PolicyKind {
        match self.reclaim_policy {
            0 => super::PolicyKind::Fifo,
            1 => super::PolicyKind::Slru {
                promote_thresh: self.lru_promote_thresh as u8,
                hot_pct: self.lru_hot_pct as u8,
            },
            2 => super::PolicyKind::Lru,
            _ => super::PolicyKind::Sieve,
        }
    }
}

impl fmt::Display for Tunables {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, value) in self.fields() {
            writeln!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tunable_accepts_its_range_and_refuses_beyond_it() {
        let mut t = Tunables::default();
        for &name in Tunables::NAMES {
            let (min, max) = Tunables::range(name).unwrap();
            t.set(name, min).unwrap();
            assert_eq!(t.get(name), Some(min));
            t.set(name, max).unwrap();
            assert_eq!(t.get(name), Some(max));
            assert!(matches!(t.set(name, max + 1), Err(TunableError::OutOfRange { .. })), "{name}");
            if min > 0 {
                assert!(t.set(name, min - 1).is_err(), "{name}");
            }
        }
        assert_eq!(t.set("nope", 1), Err(TunableError::Unknown("nope".into())));
    }

    #[test]
    fn defaults_are_flashcache_s_and_the_policy_follows_reclaim_policy() {
        let mut t = Tunables::default();
        assert_eq!((t.dirty_thresh_pct, t.fallow_delay, t.max_clean_ios_set), (20, 900, 2));
        assert_eq!(t.dirty_thresh_blocks(512), 102);
        t.set("reclaim_policy", 1).unwrap();
        t.set("lru_hot_pct", 50).unwrap();
        assert_eq!(t.policy(), super::super::PolicyKind::Slru { promote_thresh: 2, hot_pct: 50 });
        assert!(t.to_string().contains("reclaim_policy=1\n"));
    }
}
