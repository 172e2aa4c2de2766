//! Safetensors files, read defensively and written back.
//!
//! A checkpoint is untrusted input: before the `safetensors` crate parses a file, the
//! header is checked here by hand so that every problem becomes an [`Error`] that names
//! the file and, where there is one, the tensor — a file shorter than its 8-byte length
//! prefix, a header length that is absurd or longer than the file, a tensor whose bytes
//! lie past the end of the file (a truncated download), a dtype this crate does not read.
//! Files are read with plain `read`s (no memory map, so no `unsafe`): a checkpoint is
//! converted to f32 on load anyway, so the bytes are touched once.
//!
//! Every float tensor comes out as f32 ([`HostTensor`]); F16 and BF16 are widened with
//! `half`, which is exact.  I64 tensors are read only where the caller asks for them
//! (model inputs, and the `position_ids` buffers some checkpoints carry).
use crate::error::{Error, Result};
use half::{bf16, f16};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Bytes of the little-endian u64 that starts every safetensors file.
pub const HEADER_LEN_BYTES: u64 = 8;
/// The largest JSON header accepted (the limit the `safetensors` crate uses too).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Key of the free-form string map in a safetensors header.
const METADATA_KEY: &str = "__metadata__";

/// Element types this crate reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StDtype {
    /// IEEE single precision, 4 bytes.
    F32,
    /// IEEE half precision, 2 bytes.
    F16,
    /// bfloat16 (f32's 8-bit exponent, 7-bit mantissa), 2 bytes.
    BF16,
    /// Integer inputs (`input_ids`, `attention_mask`) and index buffers.
    I64,
}

impl StDtype {
    /// The header spelling ("F32", "BF16", ...).
    pub fn as_str(self) -> &'static str {
        match self {
            StDtype::F32 => "F32",
            StDtype::F16 => "F16",
            StDtype::BF16 => "BF16",
            StDtype::I64 => "I64",
        }
    }
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StDtype::F32 => 4,
            StDtype::F16 | StDtype::BF16 => 2,
            StDtype::I64 => 8,
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "F32" => Some(StDtype::F32),
            "F16" => Some(StDtype::F16),
            "BF16" => Some(StDtype::BF16),
            "I64" => Some(StDtype::I64),
            _ => None,
        }
    }
    fn from_st(d: Dtype) -> Option<Self> {
        match d {
            Dtype::F32 => Some(StDtype::F32),
            Dtype::F16 => Some(StDtype::F16),
            Dtype::BF16 => Some(StDtype::BF16),
            Dtype::I64 => Some(StDtype::I64),
            _ => None,
        }
    }
    fn to_st(self) -> Dtype {
        match self {
            StDtype::F32 => Dtype::F32,
            StDtype::F16 => Dtype::F16,
            StDtype::BF16 => Dtype::BF16,
            StDtype::I64 => Dtype::I64,
        }
    }
    /// Whether this is one of the float types a weight may be stored in.
    pub fn is_float(self) -> bool {
        !matches!(self, StDtype::I64)
    }
}

/// A dense row-major f32 tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements in row-major order; as many as the product of `shape`.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// `Err(Shape)` unless `data.len()` is the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        crate::error::check_len("HostTensor::new", "data", data.len(), n)?;
        Ok(Self { shape, data })
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// A dense row-major i64 tensor (token ids, masks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements in row-major order; as many as the product of `shape`.
    pub data: Vec<i64>,
}

impl IntTensor {
    /// `Err(Shape)` unless `data.len()` is the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<i64>) -> Result<Self> {
        let n: usize = shape.iter().product();
        crate::error::check_len("IntTensor::new", "data", data.len(), n)?;
        Ok(Self { shape, data })
    }
}

fn st_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// One validated safetensors file held in memory.
pub struct StFile {
    path: PathBuf,
    /// The whole file.
    buf: Vec<u8>,
    /// Start of the data section (8 + header length).
    data_start: usize,
    meta: Metadata,
}

impl std::fmt::Debug for StFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StFile")
            .field("path", &self.path)
            .field("bytes", &self.buf.len())
            .finish()
    }
}

/// The header checks, on the header bytes and the file length alone.
fn validate_header(path: &Path, header: &[u8], file_len: u64, header_len: u64) -> Result<()> {
    let data_len = file_len - HEADER_LEN_BYTES - header_len;
    let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| st_err(path, format!("header is not a JSON object: {e}")))?;
    for (name, entry) in &json {
        if name == METADATA_KEY {
            continue;
        }
        let bad = |msg: String| st_err(path, format!("tensor `{name}`: {msg}"));
        let dtype = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("header entry has no string `dtype`".into()))?;
        let dtype = StDtype::parse(dtype).ok_or_else(|| {
            bad(format!(
                "unsupported dtype {dtype} (this crate reads F32, F16, BF16 and I64)"
            ))
        })?;
        let shape: Vec<u64> = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad("header entry has no integer array `shape`".into()))?;
        let offs: Vec<u64> = entry
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect::<Option<Vec<_>>>())
            .filter(|v| v.len() == 2)
            .ok_or_else(|| bad("header entry has no `data_offsets` [begin, end]".into()))?;
        let (begin, end) = (offs[0], offs[1]);
        if begin > end {
            return Err(bad(format!("data_offsets [{begin}, {end}] run backwards")));
        }
        if end > data_len {
            return Err(bad(format!(
                "data ends at byte {end} of the data section but the file holds only \
                 {data_len} data bytes (truncated file?)"
            )));
        }
        let want = shape
            .iter()
            .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
        if want != end - begin {
            return Err(bad(format!(
                "shape {shape:?} of {} needs {want} bytes but data_offsets give {}",
                dtype.as_str(),
                end - begin
            )));
        }
    }
    Ok(())
}

impl StFile {
    /// Reads and validates `path`; see the module docs for what is checked.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        if file_len < HEADER_LEN_BYTES {
            return Err(st_err(
                path,
                format!(
                    "file is {file_len} bytes, shorter than the {HEADER_LEN_BYTES}-byte \
                     header length prefix"
                ),
            ));
        }
        let mut prefix = [0u8; HEADER_LEN_BYTES as usize];
        f.read_exact(&mut prefix).map_err(|e| Error::io(path, e))?;
        let header_len = u64::from_le_bytes(prefix);
        if header_len > MAX_HEADER_BYTES {
            return Err(st_err(
                path,
                format!(
                    "header length {header_len} is absurdly large (limit {MAX_HEADER_BYTES} \
                     bytes): not a safetensors file or corrupted"
                ),
            ));
        }
        if HEADER_LEN_BYTES + header_len > file_len {
            return Err(st_err(
                path,
                format!(
                    "header claims {header_len} bytes but the file holds only {} after the \
                     length prefix (truncated file?)",
                    file_len - HEADER_LEN_BYTES
                ),
            ));
        }
        let mut buf = Vec::with_capacity(file_len as usize);
        buf.extend_from_slice(&prefix);
        f.read_to_end(&mut buf).map_err(|e| Error::io(path, e))?;
        if buf.len() as u64 != file_len {
            return Err(st_err(path, "file changed size while being read"));
        }
        let data_start = (HEADER_LEN_BYTES + header_len) as usize;
        validate_header(
            path,
            &buf[HEADER_LEN_BYTES as usize..data_start],
            file_len,
            header_len,
        )?;
        // The crate checks the rest: contiguous offsets, data section fully covered.
        let (_, meta) =
            SafeTensors::read_metadata(&buf).map_err(|e| st_err(path, format!("{e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            buf,
            data_start,
            meta,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, in file order.
    pub fn names(&self) -> Vec<String> {
        self.meta.offset_keys()
    }

    /// Whether the file has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.meta.info(name).is_some()
    }

    /// Stored dtype and shape of `name`.
    pub fn info(&self, name: &str) -> Option<(StDtype, &[usize])> {
        let i = self.meta.info(name)?;
        // validate_header rejected every other dtype.
        Some((StDtype::from_st(i.dtype)?, &i.shape))
    }

    fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self.meta.info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        let (b, e) = info.data_offsets;
        Ok((info, &self.buf[self.data_start + b..self.data_start + e]))
    }

    /// `name` as f32, widening F16/BF16.  An I64 tensor is an error naming it.
    pub fn f32(&self, name: &str) -> Result<HostTensor> {
        let (info, bytes) = self.raw(name)?;
        let data: Vec<f32> = match StDtype::from_st(info.dtype) {
            Some(StDtype::F32) => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Some(StDtype::F16) => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Some(StDtype::BF16) => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => {
                return Err(st_err(
                    &self.path,
                    format!(
                        "tensor `{name}` is {:?}, expected a float tensor (F32, F16 or BF16)",
                        info.dtype
                    ),
                ))
            }
        };
        Ok(HostTensor {
            shape: info.shape.clone(),
            data,
        })
    }

    /// `name` as i64.  Only I64 is accepted: token ids stored as floats are a bug upstream.
    pub fn i64(&self, name: &str) -> Result<IntTensor> {
        let (info, bytes) = self.raw(name)?;
        if info.dtype != Dtype::I64 {
            return Err(st_err(
                &self.path,
                format!("tensor `{name}` is {:?}, expected I64", info.dtype),
            ));
        }
        let data = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("chunks_exact(8)")))
            .collect();
        Ok(IntTensor {
            shape: info.shape.clone(),
            data,
        })
    }

    /// The `__metadata__` string map, if any.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.meta.metadata().as_ref()
    }
}

/// One tensor to write: encoded bytes plus header facts.
struct OutTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &OutTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn encode_f32(t: &HostTensor, dtype: StDtype) -> Vec<u8> {
    match dtype {
        StDtype::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        StDtype::F16 => t
            .data
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        StDtype::BF16 => t
            .data
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        StDtype::I64 => unreachable!("encode_f32 is only called with float dtypes"),
    }
}

/// What [`write_safetensors`] writes under one name.
pub enum OutValue<'a> {
    /// Floats, stored in the given float dtype (rounded to nearest even).
    Float(&'a HostTensor, StDtype),
    /// Integers, stored as I64.
    Int(&'a IntTensor),
}

/// Writes `tensors` to `path` with `{"format": "pt"}` metadata, as `save_pretrained` does.
pub fn write_safetensors(path: impl AsRef<Path>, tensors: &[(String, OutValue<'_>)]) -> Result<()> {
    let path = path.as_ref();
    let mut out: BTreeMap<&str, OutTensor> = BTreeMap::new();
    for (name, v) in tensors {
        // the fields are public, so a tensor built by hand may disagree with its shape:
        // refuse it here rather than write a file no reader accepts
        let (len, shape) = match v {
            OutValue::Float(t, _) => (t.data.len(), &t.shape),
            OutValue::Int(t) => (t.data.len(), &t.shape),
        };
        if len != shape.iter().product::<usize>() {
            return Err(Error::arg(
                "write_safetensors",
                format!("tensor `{name}`: {len} elements for shape {shape:?}"),
            ));
        }
        let t = match v {
            OutValue::Float(t, dtype) => {
                if !dtype.is_float() {
                    return Err(Error::arg(
                        "write_safetensors",
                        format!("tensor `{name}`: I64 is not a float dtype"),
                    ));
                }
                OutTensor {
                    dtype: dtype.to_st(),
                    shape: t.shape.clone(),
                    bytes: encode_f32(t, *dtype),
                }
            }
            OutValue::Int(t) => OutTensor {
                dtype: Dtype::I64,
                shape: t.shape.clone(),
                bytes: t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            },
        };
        if out.insert(name.as_str(), t).is_some() {
            return Err(Error::arg(
                "write_safetensors",
                format!("tensor `{name}` given twice"),
            ));
        }
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    // serialized in memory, then written under a temporary name and renamed, so a
    // reader never sees half a checkpoint
    let bytes = safetensors::serialize(out.iter().map(|(k, v)| (*k, v)), Some(meta))
        .map_err(|e| st_err(path, format!("write failed: {e}")))?;
    crate::fsio::write_atomic(path, &bytes)
}

/// Shorthand: every tensor F32.
pub fn write_f32(path: impl AsRef<Path>, tensors: &[(String, &HostTensor)]) -> Result<()> {
    let v: Vec<(String, OutValue<'_>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), OutValue::Float(t, StDtype::F32)))
        .collect();
    write_safetensors(path, &v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("popen-io-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join(name)
    }

    #[test]
    fn roundtrip_all_dtypes() {
        let t = HostTensor::new(vec![2, 3], vec![1.0, -2.5, 3.25, 0.0, 1e-3, 7.0]).unwrap();
        let ids = IntTensor::new(vec![3], vec![0, -1, i64::MAX]).unwrap();
        let p = tmp("rt.safetensors");
        write_safetensors(
            &p,
            &[
                ("a".into(), OutValue::Float(&t, StDtype::F32)),
                ("b".into(), OutValue::Float(&t, StDtype::BF16)),
                ("c".into(), OutValue::Float(&t, StDtype::F16)),
                ("ids".into(), OutValue::Int(&ids)),
            ],
        )
        .unwrap();
        let f = StFile::open(&p).unwrap();
        assert_eq!(f.f32("a").unwrap(), t);
        assert_eq!(f.info("b").unwrap().0, StDtype::BF16);
        let b = f.f32("b").unwrap();
        for (x, y) in b.data.iter().zip(&t.data) {
            assert_eq!(*x, bf16::from_f32(*y).to_f32());
        }
        let c = f.f32("c").unwrap();
        for (x, y) in c.data.iter().zip(&t.data) {
            assert_eq!(*x, f16::from_f32(*y).to_f32());
        }
        assert_eq!(f.i64("ids").unwrap(), ids);
        assert!(f.f32("ids").is_err());
        assert!(f.i64("a").is_err());
        assert!(matches!(f.f32("zzz"), Err(Error::MissingTensor { .. })));
    }

    /// A tensor whose elements disagree with its shape is refused by name, by the
    /// constructors and by the writer (the fields are public), and nothing is written.
    #[test]
    fn a_tensor_whose_data_disagrees_with_its_shape_is_refused() {
        assert!(IntTensor::new(vec![2, 2], vec![1, 2, 3]).is_err());
        assert!(HostTensor::new(vec![2, 2], vec![1.0; 5]).is_err());
        let p = tmp("bad.safetensors");
        let _ = std::fs::remove_file(&p);
        let ids = IntTensor {
            shape: vec![2, 2],
            data: vec![1, 2, 3],
        };
        let e = write_safetensors(&p, &[("ids".into(), OutValue::Int(&ids))]).unwrap_err();
        assert!(
            e.to_string().contains("`ids`") && e.to_string().contains("[2, 2]"),
            "{e}"
        );
        let t = HostTensor {
            shape: vec![3],
            data: vec![0.0; 4],
        };
        let e = write_f32(&p, &[("w".into(), &t)]).unwrap_err();
        assert!(e.to_string().contains("`w`"), "{e}");
        assert!(!p.exists());
    }
}
