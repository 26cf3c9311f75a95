//! Keep bits, one per parameter: a cleared bit marks a pruned parameter, which is zero,
//! is not trained and is not sent.

use std::ops::Range;

/// A bit set over the flat parameter vector; bit set = parameter kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mask {
    words: Vec<u64>,
    len: usize,
}

impl Mask {
    /// Returns a mask that keeps every one of `len` parameters.
    pub fn all_kept(len: usize) -> Self {
        let mut words = vec![u64::MAX; len.div_ceil(64)];
        if let Some(last) = words.last_mut() {
            let tail = len % 64;
            if tail != 0 {
                *last = (1u64 << tail) - 1;
            }
        }
        Self { words, len }
    }

    pub fn from_bools(bits: &[bool]) -> Self {
        let mut mask = Self {
            words: vec![0; bits.len().div_ceil(64)],
            len: bits.len(),
        };
        for (index, &keep) in bits.iter().enumerate() {
            if keep {
                mask.words[index / 64] |= 1 << (index % 64);
            }
        }
        mask
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, index: usize) -> bool {
        assert!(
            index < self.len,
            "mask index {index} out of range {}",
            self.len
        );
        self.words[index / 64] >> (index % 64) & 1 == 1
    }

    pub fn set(&mut self, index: usize, keep: bool) {
        assert!(
            index < self.len,
            "mask index {index} out of range {}",
            self.len
        );
        let bit = 1u64 << (index % 64);
        if keep {
            self.words[index / 64] |= bit;
        } else {
            self.words[index / 64] &= !bit;
        }
    }

    /// Number of kept parameters.
    pub fn count_kept(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Number of kept parameters within `range`.
    pub fn count_kept_in(&self, range: Range<usize>) -> usize {
        range.filter(|&i| self.get(i)).count()
    }

    /// Fraction of pruned parameters, in [0, 1].
    pub fn sparsity(&self) -> f64 {
        if self.len == 0 {
            return 0.0;
        }
        1.0 - self.count_kept() as f64 / self.len as f64
    }

    pub fn to_bools(&self) -> Vec<bool> {
        (0..self.len).map(|i| self.get(i)).collect()
    }

    /// Packs the bits of `range`, least significant bit first, into bytes.
    pub fn pack_range(&self, range: Range<usize>) -> Vec<u8> {
        let mut bytes = vec![0u8; range.len().div_ceil(8)];
        for (k, index) in range.enumerate() {
            if self.get(index) {
                bytes[k / 8] |= 1 << (k % 8);
            }
        }
        bytes
    }

    /// Writes `len` packed bits (as from [`Mask::pack_range`]) into the mask starting at `start`.
    /// Returns false, changing nothing, when `bytes` is too short for `len` bits.
    pub fn unpack_range(&mut self, start: usize, len: usize, bytes: &[u8]) -> bool {
        if bytes.len() < len.div_ceil(8) || start + len > self.len {
            return false;
        }
        for k in 0..len {
            self.set(start + k, bytes[k / 8] >> (k % 8) & 1 == 1);
        }
        true
    }

    /// Sets every pruned position of `values` (a slice starting at `start`) to exactly zero.
    pub fn apply(&self, start: usize, values: &mut [f32]) {
        for (k, value) in values.iter_mut().enumerate() {
            if !self.get(start + k) {
                *value = 0.0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_all_kept_counts_exactly() {
        for len in [0, 1, 63, 64, 65, 200] {
            let mask = Mask::all_kept(len);
            assert_eq!(mask.count_kept(), len);
            assert_eq!(mask.sparsity(), 0.0);
        }
    }

    #[test]
    fn mask_set_get_and_sparsity() {
        let mut mask = Mask::all_kept(100);
        for i in (0..100).step_by(4) {
            mask.set(i, false);
        }
        assert!(!mask.get(0));
        assert!(mask.get(1));
        assert_eq!(mask.count_kept(), 75);
        assert!((mask.sparsity() - 0.25).abs() < 1e-12);
        assert_eq!(mask.count_kept_in(0..8), 6);
    }

    #[test]
    fn mask_pack_unpack_round_trip() {
        let bits: Vec<bool> = (0..77).map(|i| i % 3 != 0).collect();
        let mask = Mask::from_bools(&bits);
        let packed = mask.pack_range(5..70);
        assert_eq!(packed.len(), 9);

        let mut copy = Mask::all_kept(77);
        assert!(copy.unpack_range(5, 65, &packed));
        for (i, &bit) in bits.iter().enumerate().take(70).skip(5) {
            assert_eq!(copy.get(i), bit, "bit {i}");
        }
        assert!(!copy.unpack_range(5, 65, &packed[..8]));
    }

    #[test]
    fn mask_apply_zeroes_pruned() {
        let mask = Mask::from_bools(&[true, false, true, false]);
        let mut values = [1.0, 2.0, 3.0, 4.0];
        mask.apply(0, &mut values);
        assert_eq!(values, [1.0, 0.0, 3.0, 0.0]);
    }
}
