//! The method itself: the preference losses (Eq. 2–4), stage 1 ([`sft`]), stage 2
//! ([`pref`]: `Pt` and `Lt` so far), prediction, the ensemble ([`ensemble`], Eq. 5, 6);
//! Alg. 1's `Ps` and stage 3 as they are built.
pub mod demo;
pub mod ensemble;
pub mod losses;
pub mod predict;
pub mod pref;
pub mod sft;
