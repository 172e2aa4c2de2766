//! The method itself: preference losses (Eq. 2–4) now; collection (Alg. 1), ensemble
//! (Eq. 5, 6) and the training stages as they are built.
pub mod losses;
pub mod predict;
pub mod sft;
