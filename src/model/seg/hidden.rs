//! The hidden states that predicted a decoded answer's tokens, left in the buffers the
//! forwards wrote them to.
//!
//! A decode step of n rows writes one (n, C) buffer; every answer it served keeps a
//! shared handle on it and its row's index, so keeping a row copies nothing.  Only the
//! rows something reads are copied out, when it reads them: the codebook groups' rows
//! that become masks, and the ensemble's segmentation embeddings.  (Copying each
//! step's rows apart was 44 % of the driver calls of `popen predict --ensemble 4`.)
use crate::backend::Backend;
use crate::error::{Error, Result};
use num_traits::Float;
use std::sync::Arc;

/// Row `row` of a shared (n, C) buffer of hidden states.
#[derive(Debug)]
pub(crate) struct HiddenRow<Buf> {
    buf: Arc<Buf>,
    row: usize,
}

// a handle's copy shares the buffer: no `Buf: Clone` bound, no copy of the values
impl<Buf> Clone for HiddenRow<Buf> {
    fn clone(&self) -> Self {
        HiddenRow {
            buf: self.buf.clone(),
            row: self.row,
        }
    }
}

impl<Buf> HiddenRow<Buf> {
    /// Each of the `n` rows (width `w`) of `buf`, sharing it; a buffer of another
    /// length is an error.
    pub(crate) fn each_of<F: Float, B: Backend<F, Buf = Buf>>(
        be: &B,
        buf: Buf,
        n: usize,
        w: usize,
    ) -> Result<Vec<Self>> {
        crate::error::check_len("HiddenRow::each_of", "rows", be.len(&buf), n * w)?;
        let buf = Arc::new(buf);
        Ok((0..n)
            .map(|row| HiddenRow {
                buf: buf.clone(),
                row,
            })
            .collect())
    }

    /// Row `row` of `buf`, alone.
    pub(crate) fn one(buf: Buf, row: usize) -> Self {
        HiddenRow {
            buf: Arc::new(buf),
            row,
        }
    }
}

/// The hidden states (C each) that predicted an answer's tokens: row `t` predicted
/// token `t`.  The rows stay in the buffers their forwards wrote; [`HiddenRows::gather`]
/// copies out the ones a caller reads.
#[derive(Clone, Debug)]
pub struct HiddenRows<Buf> {
    rows: Vec<HiddenRow<Buf>>,
}

impl<Buf> Default for HiddenRows<Buf> {
    fn default() -> Self {
        HiddenRows { rows: Vec::new() }
    }
}

impl<Buf> HiddenRows<Buf> {
    /// The `n` rows (width `w`) of one buffer, in order; a buffer of another length is
    /// an error.
    pub fn of_buffer<F: Float, B: Backend<F, Buf = Buf>>(
        be: &B,
        buf: Buf,
        n: usize,
        w: usize,
    ) -> Result<Self> {
        Ok(HiddenRows {
            rows: HiddenRow::each_of(be, buf, n, w)?,
        })
    }

    /// How many rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Rows `ts` of `other` (shared, not copied), after these; an index past `other`'s
    /// end is an error.
    pub(crate) fn extend_from(
        &mut self,
        other: &HiddenRows<Buf>,
        ts: impl IntoIterator<Item = usize>,
    ) -> Result<()> {
        for t in ts {
            self.rows.push(other.get(t)?.clone());
        }
        Ok(())
    }

    /// One more row, after the others.
    pub(crate) fn push(&mut self, r: HiddenRow<Buf>) {
        self.rows.push(r);
    }

    /// Rows `ts`, in that order, side by side in one (|ts|, `w`) buffer.  Rows that
    /// follow each other in one source buffer are copied in one op.  A row index past
    /// the end, or a source buffer too short for its row, is an error.
    pub fn gather<F: Float, B: Backend<F, Buf = Buf>>(
        &self,
        be: &B,
        ts: &[usize],
        w: usize,
    ) -> Result<Buf> {
        let mut out = be.uninit(ts.len() * w);
        let mut i = 0;
        while i < ts.len() {
            let first = self.get(ts[i])?;
            // the run of rows ts[i..j] that sit one after another in first's buffer
            let mut j = i + 1;
            while j < ts.len() {
                let r = self.get(ts[j])?;
                if !Arc::ptr_eq(&r.buf, &first.buf) || r.row != first.row + (j - i) {
                    break;
                }
                j += 1;
            }
            be.copy_range(&mut out, i * w, &first.buf, first.row * w, (j - i) * w)?;
            i = j;
        }
        Ok(out)
    }

    /// Every row, in order, in one (len, `w`) buffer.
    pub fn gather_all<F: Float, B: Backend<F, Buf = Buf>>(&self, be: &B, w: usize) -> Result<Buf> {
        self.gather(be, &(0..self.len()).collect::<Vec<_>>(), w)
    }

    fn get(&self, t: usize) -> Result<&HiddenRow<Buf>> {
        self.rows.get(t).ok_or_else(|| {
            Error::shape(
                "HiddenRows::gather",
                format!("row {t} of {} rows", self.rows.len()),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{HiddenRow, HiddenRows};
    use crate::backend::{Backend, Cpu};

    #[test]
    fn gathered_rows_are_the_rows_asked_for_in_order() {
        let be = Cpu;
        let w = 3;
        let a: Vec<f32> = (0..4 * w).map(|x| x as f32).collect();
        let b: Vec<f32> = (0..2 * w).map(|x| 100.0 + x as f32).collect();
        let mut rows = HiddenRows::of_buffer(&be, a.clone(), 4, w).unwrap();
        assert!(HiddenRows::of_buffer(&be, a.clone(), 3, w).is_err());
        rows.push(HiddenRow::one(b.clone(), 1));
        HiddenRow::each_of(&be, b.clone(), 2, w)
            .unwrap()
            .into_iter()
            .for_each(|r| rows.push(r));
        assert_eq!(rows.len(), 7);
        let row_of = |t: usize| -> Vec<f32> {
            match t {
                0..=3 => a[t * w..(t + 1) * w].to_vec(),
                4 => b[w..2 * w].to_vec(),
                _ => b[(t - 5) * w..(t - 4) * w].to_vec(),
            }
        };
        // runs within one buffer, a row of a copy of another, a row repeated, backwards
        for ts in [
            vec![0, 1, 2, 3, 4, 5, 6],
            vec![2, 3, 4, 5, 6],
            vec![6, 5, 1, 1, 0],
        ] {
            let got = rows.gather(&be, &ts, w).unwrap();
            let want: Vec<f32> = ts.iter().flat_map(|&t| row_of(t)).collect();
            assert_eq!(be.to_vec(&got), want, "rows {ts:?}");
        }
        assert_eq!(be.to_vec(&rows.gather_all(&be, w).unwrap()).len(), 7 * w);
        assert!(rows.gather(&be, &[], w).unwrap().is_empty());
        let err = rows.gather(&be, &[1, 7], w).unwrap_err().to_string();
        assert!(err.contains("row 7 of 7"), "{err}");
    }
}
