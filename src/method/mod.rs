//! The method itself: the preference losses (Eq. 2–4), stage 1 ([`sft`], with its two
//! optional data mixes [`presence`] and [`reread`]), stage 2 ([`pref`]: `Pt`, Alg. 1's
//! `Ps`, `Lt` and `Ls`), the ensemble and stage 3 ([`ensemble`]: Eq. 5, 6, 8, 9),
//! prediction ([`predict`]) and the whole method on the embedded world ([`demo`]).
pub mod counterfactual;
pub mod demo;
pub mod ensemble;
pub mod losses;
pub mod predict;
pub mod pref;
pub mod presence;
pub mod reread;
pub mod sft;
