//! Readers for the real data sets; each returns [`Sample`](super::sample::Sample)s.
//! The public entry points are re-exported from [`super::sample`].
pub mod grandf;
pub mod muse;
pub mod reasonseg;
pub mod refcoco;
