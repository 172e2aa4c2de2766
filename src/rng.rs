//! SplitMix64 (Steele, Lea and Flood 2014), the one mixer behind the crate's seeded
//! generators: the sampler's [`nn::Rng`](crate::nn::Rng) steps it directly, and the
//! world's xoshiro256** ([`data::world::rng`](crate::data::world::rng)) seeds and hashes
//! through it.  Written here rather than taken from `rand` so that sampled tokens and
//! the world's bytes cannot change when a dependency changes its algorithms.

/// The SplitMix64 increment (2⁶⁴ / φ, odd).
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// One SplitMix64 step from state `z`: the output for state `z + GOLDEN_GAMMA`.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first outputs of the reference C implementation seeded with 1234567
    /// (`x += 0x9e3779b97f4a7c15; ...` from Vigna's splitmix64.c).
    #[test]
    fn matches_the_reference_sequence() {
        let mut state = 1234567u64;
        let want = [
            6457827717110365317u64,
            3203168211198807973,
            9817491932198370423,
            4593380528125082431,
            16408922859458223821,
        ];
        for w in want {
            assert_eq!(splitmix64(state), w);
            state = state.wrapping_add(GOLDEN_GAMMA);
        }
    }
}
