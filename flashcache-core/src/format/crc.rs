//! CRC-32C (Castagnoli), table-driven, no dependencies.
//!
//! The parameters are the usual ones (iSCSI, ext4, btrfs, SSE4.2 `crc32`):
//! reflected polynomial `0x82F6_3B78`, initial value and final XOR `0xFFFF_FFFF`.

/// The reflected CRC-32C polynomial.
const POLY: u32 = 0x82F6_3B78;

/// The byte-at-a-time lookup table, built at compile time.
const TABLE: [u32; 256] = build_table();

const fn build_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut crc = n as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ POLY } else { crc >> 1 };
            bit += 1;
        }
        table[n] = crc;
        n += 1;
    }
    table
}

/// An incremental CRC-32C computation, for checksums over data that is not one
/// contiguous slice (a slot's CRC covers its first 12 bytes followed by its index).
///
/// ```
/// use flashcache_core::format::{Crc32c, crc32c};
///
/// let mut crc = Crc32c::new();
/// crc.update(b"1234");
/// crc.update(b"56789");
/// assert_eq!(crc.finish(), crc32c(b"123456789"));
/// assert_eq!(crc32c(b"123456789"), 0xE306_9283);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crc32c {
    state: u32,
}

impl Crc32c {
    /// Starts a new computation.
    #[must_use]
    pub const fn new() -> Self {
        Self { state: 0xFFFF_FFFF }
    }

    /// Feeds `bytes` into the computation.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut crc = self.state;
        for &byte in bytes {
            // `(crc ^ byte) & 0xFF` is always < 256, so this index cannot fail.
            crc = (crc >> 8) ^ TABLE[((crc ^ u32::from(byte)) & 0xFF) as usize];
        }
        self.state = crc;
    }

    /// The CRC of everything fed so far (the computation can go on afterwards).
    #[must_use]
    pub const fn finish(&self) -> u32 {
        self.state ^ 0xFFFF_FFFF
    }
}

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

/// The CRC-32C (Castagnoli) of `bytes`.
///
/// ```
/// assert_eq!(flashcache_core::format::crc32c(b"123456789"), 0xE306_9283);
/// ```
#[must_use]
pub fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = Crc32c::new();
    crc.update(bytes);
    crc.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // The check value of the CRC-32C catalogue entry.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 (iSCSI), appendix B.4.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
        let descending: Vec<u8> = (0u8..32).rev().collect();
        assert_eq!(crc32c(&descending), 0x113F_DB5C);
    }

    #[test]
    fn incremental_matches_one_shot() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        for split in [0, 1, 7, 500, 999, 1000] {
            let (a, b) = data.split_at(split);
            let mut crc = Crc32c::default();
            crc.update(a);
            crc.update(b);
            assert_eq!(crc.finish(), crc32c(&data), "split at {split}");
        }
    }

    #[test]
    fn table_spot_checks() {
        assert_eq!(TABLE[0], 0);
        assert_eq!(TABLE[1], 0xF26B_8303);
        assert_eq!(TABLE[128], POLY);
        assert_eq!(TABLE[255], 0xAD7D_5351);
    }
}
