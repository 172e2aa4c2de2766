//! The method itself: the preference losses (Eq. 2–4), stage 1 ([`sft`]), stage 2
//! ([`pref`]: `Pt` and `Lt` so far; Alg. 1's `Ps` is next), the ensemble and stage 3
//! ([`ensemble`]: Eq. 5, 6, 8, 9), prediction ([`predict`]) and the whole method on the
//! embedded world ([`demo`]).
pub mod demo;
pub mod ensemble;
pub mod losses;
pub mod predict;
pub mod pref;
pub mod presence;
pub mod sft;
