//! A seeded random source and a Zipf sampler (precomputed CDF, binary search).

/// xorshift64*: small, fast, seeded; good enough to pick ids and operations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value; 0 is replaced by a fixed odd constant).
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed, so that nearby seeds start far apart.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Rng(if z == 0 { 0x2545_F491_4F6C_DD1D } else { z })
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf's law over `1..=n`: rank `k` is drawn with probability proportional to `1 / k^s`.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// The most items a distribution is built over (100 million: an 800 MB table).
    pub const MAX_ITEMS: u64 = 100_000_000;

    /// The distribution over `1..=n` with exponent `s`.
    ///
    /// # Errors
    /// `n` is 0 or over [`Zipf::MAX_ITEMS`], or `s` is not a finite non-negative number.
    pub fn new(n: u64, s: f64) -> Result<Zipf, String> {
        if n == 0 {
            return Err("zipf: at least one item".to_owned());
        }
        if n > Self::MAX_ITEMS {
            return Err(format!(
                "zipf: at most {} items (its table takes 8 bytes per item), not {n}",
                Self::MAX_ITEMS
            ));
        }
        if !s.is_finite() || s < 0.0 {
            return Err(format!("zipf: invalid exponent {s}"));
        }
        let mut cdf = Vec::with_capacity(n as usize);
        let mut total = 0.0;
        for k in 1..=n {
            total += 1.0 / (k as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Ok(Zipf { cdf })
    }

    /// A rank in `1..=n`.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.next_f64();
        let i = self.cdf.partition_point(|&c| c < u);
        i.min(self.cdf.len() - 1) as u64 + 1
    }

    /// The probability of the `k` most frequent ranks together.
    pub fn head_mass(&self, k: usize) -> f64 {
        match k {
            0 => 0.0,
            k => self.cdf[k.min(self.cdf.len()) - 1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_stay_in_range_and_favour_low_ranks() {
        let z = Zipf::new(1000, 1.1).unwrap();
        let mut rng = Rng::new(7);
        let mut ones = 0;
        for _ in 0..100_000 {
            let k = z.sample(&mut rng);
            assert!((1..=1000).contains(&k));
            ones += u32::from(k == 1);
        }
        // P(1) = 1 / H(1000, 1.1) ≈ 0.179: within a few standard deviations (~0.0012).
        let p = f64::from(ones) / 100_000.0;
        assert!((p - z.head_mass(1)).abs() < 0.01, "p(1) = {p}");
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(Zipf::new(0, 1.1).is_err());
        // Not an 8 TB allocation: an error.
        let e = Zipf::new(u64::MAX, 1.1).unwrap_err();
        assert!(e.contains("at most 100000000 items"), "{e}");
        assert!(Zipf::new(10, f64::NAN).is_err());
        assert!(Zipf::new(10, -1.0).is_err());
    }
}
