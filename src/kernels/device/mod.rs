//! One launch interface for two devices: the CUDA emulator (the `.cu` kernels compiled
//! for the host by `build.rs`, run with host threads as blocks and fibers as threads)
//! and, with the `cuda` feature, a real GPU through cudarc.
//!
//! Both take the same argument list — an array of pointers to the arguments, exactly
//! what `cuLaunchKernel` takes — so the launch wrappers in the kernel modules are the
//! same code on both, and every CI run exercises them.
//!
//! ```
//! use popen::kernels::{Device, LaunchCfg, KArg};
//! let dev = Device::emulator();
//! let x = dev.upload(&[1.0f32, 2.0, 3.0]).unwrap();
//! let mut y = dev.zeros::<f32>(3).unwrap();
//! // y = 2 * x
//! dev.launch("scale_f32", LaunchCfg::linear(3, 128),
//!            &[y.arg_mut(), x.arg(), KArg::F32(2.0), KArg::I64(3)]).unwrap();
//! assert_eq!(dev.download(&y).unwrap(), vec![2.0, 4.0, 6.0]);
//! ```
use super::profile::{Profiler, Start};
use crate::error::{Error, Result};
use std::ffi::{c_char, c_void, CString};
use std::fmt;

/// Element types that can live in a device buffer.
pub trait Elem: bytemuck::Pod + Send + Sync + fmt::Debug + 'static + cuda_repr::Repr {}
impl Elem for f32 {}
impl Elem for f64 {}
impl Elem for i32 {}
impl Elem for u32 {}
impl Elem for i64 {}
impl Elem for u64 {}
impl Elem for u8 {}
impl Elem for u16 {}

#[cfg(feature = "cuda")]
mod cuda_repr {
    pub trait Repr: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits {}
    impl<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits> Repr for T {}
}
#[cfg(not(feature = "cuda"))]
mod cuda_repr {
    pub trait Repr {}
    impl<T> Repr for T {}
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchCfg {
    /// Number of blocks along x, y, z (`gridDim`).
    pub grid: [u32; 3],
    /// Threads per block along x, y, z (`blockDim`).
    pub block: [u32; 3],
    /// Dynamic shared memory per block, in bytes; above 48 KiB the CUDA path raises the
    /// kernel's opt-in limit first.
    pub shmem: u32,
}

impl LaunchCfg {
    /// One thread per element: `ceil(n / block)` blocks of `block` threads.
    pub fn linear(n: usize, block: u32) -> Self {
        let g = n.div_ceil(block as usize).max(1) as u32;
        LaunchCfg {
            grid: [g, 1, 1],
            block: [block, 1, 1],
            shmem: 0,
        }
    }
    /// Explicit 3-D grid and block.
    pub fn new(grid: [u32; 3], block: [u32; 3], shmem: u32) -> Self {
        LaunchCfg { grid, block, shmem }
    }
}

/// A kernel argument: a device pointer or a scalar, passed by value.
#[derive(Clone, Copy, Debug)]
pub enum KArg {
    /// Device address (host address on the emulator).
    Ptr(u64),
    /// 32-bit signed integer (`int`).
    I32(i32),
    /// 32-bit unsigned integer (`unsigned int`).
    U32(u32),
    /// 64-bit signed integer (`long long`).
    I64(i64),
    /// 64-bit unsigned integer (`unsigned long long`).
    U64(u64),
    /// 32-bit float (`float`).
    F32(f32),
}

impl KArg {
    fn raw(&self) -> ([u8; 8], usize) {
        let mut b = [0u8; 8];
        let n = match *self {
            KArg::Ptr(v) | KArg::U64(v) => {
                b.copy_from_slice(&v.to_ne_bytes());
                8
            }
            KArg::I64(v) => {
                b.copy_from_slice(&v.to_ne_bytes());
                8
            }
            KArg::I32(v) => {
                b[..4].copy_from_slice(&v.to_ne_bytes());
                4
            }
            KArg::U32(v) => {
                b[..4].copy_from_slice(&v.to_ne_bytes());
                4
            }
            KArg::F32(v) => {
                b[..4].copy_from_slice(&v.to_ne_bytes());
                4
            }
        };
        (b, n)
    }
}

/// The byte the emulator fills a [`Device::uninit`] buffer with.
pub const UNINIT_BYTE: u8 = 0xFF;

/// Which device a [`Device`] drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The kernels compiled for the host and run by the CUDA emulator.
    Emulator,
    /// A real GPU through cudarc.
    Cuda,
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Emulator => "emu",
            DeviceKind::Cuda => "cuda",
        })
    }
}

/// A buffer in device memory (host memory on the emulator).
pub struct DeviceBuf<T: Elem> {
    len: usize,
    inner: BufInner<T>,
}

enum BufInner<T: Elem> {
    Host(Vec<T>),
    #[cfg(feature = "cuda")]
    Cuda(
        cudarc::driver::CudaSlice<T>,
        std::sync::Arc<cudarc::driver::CudaStream>,
    ),
}

impl<T: Elem> DeviceBuf<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The buffer as a read-only kernel argument.
    pub fn arg(&self) -> KArg {
        match &self.inner {
            BufInner::Host(v) => KArg::Ptr(v.as_ptr() as u64),
            #[cfg(feature = "cuda")]
            BufInner::Cuda(s, st) => {
                use cudarc::driver::DevicePtr;
                let (p, _sync) = s.device_ptr(st);
                KArg::Ptr(p)
            }
        }
    }
    /// The buffer as a kernel argument the kernel writes to.
    pub fn arg_mut(&mut self) -> KArg {
        match &mut self.inner {
            BufInner::Host(v) => KArg::Ptr(v.as_mut_ptr() as u64),
            #[cfg(feature = "cuda")]
            BufInner::Cuda(s, st) => {
                use cudarc::driver::DevicePtrMut;
                let (p, _sync) = s.device_ptr_mut(st);
                KArg::Ptr(p)
            }
        }
    }
}

impl<T: Elem> Clone for DeviceBuf<T> {
    /// A device-to-device copy (no host round trip).
    fn clone(&self) -> Self {
        DeviceBuf {
            len: self.len,
            inner: match &self.inner {
                BufInner::Host(v) => BufInner::Host(v.clone()),
                #[cfg(feature = "cuda")]
                BufInner::Cuda(s, st) => BufInner::Cuda(s.clone(), st.clone()),
            },
        }
    }
}

impl<T: Elem> fmt::Debug for DeviceBuf<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceBuf<{}>({})", std::any::type_name::<T>(), self.len)
    }
}

impl<T: Elem> DeviceBuf<T> {
    /// The buffer from element `off` on as a read-only kernel argument (`off ≤ len`).
    #[track_caller]
    pub fn arg_at(&self, off: usize) -> KArg {
        assert!(
            off <= self.len,
            "offset {off} past a buffer of {}",
            self.len
        );
        match self.arg() {
            KArg::Ptr(p) => KArg::Ptr(p + (off * std::mem::size_of::<T>()) as u64),
            a => a,
        }
    }
    /// [`DeviceBuf::arg_at`] for a buffer the kernel writes to.
    #[track_caller]
    pub fn arg_mut_at(&mut self, off: usize) -> KArg {
        assert!(
            off <= self.len,
            "offset {off} past a buffer of {}",
            self.len
        );
        match self.arg_mut() {
            KArg::Ptr(p) => KArg::Ptr(p + (off * std::mem::size_of::<T>()) as u64),
            a => a,
        }
    }
    /// The emulator's host storage (None on a GPU).
    pub(crate) fn host(&self) -> Option<&[T]> {
        match &self.inner {
            BufInner::Host(v) => Some(&v[..self.len]),
            #[cfg(feature = "cuda")]
            BufInner::Cuda(..) => None,
        }
    }
    /// The emulator's host storage, writable (None on a GPU).
    pub(crate) fn host_mut(&mut self) -> Option<&mut [T]> {
        let n = self.len;
        match &mut self.inner {
            BufInner::Host(v) => Some(&mut v[..n]),
            #[cfg(feature = "cuda")]
            BufInner::Cuda(..) => None,
        }
    }
}

/// Host↔device copies a [`Device`] has made: what "buffers stay on the device" is
/// tested against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyCount {
    /// Host to device: `upload`, `write`.
    pub htod: u64,
    /// Device to host: `download`.
    pub dtoh: u64,
}

/// The profile's row of host-to-device copies ([`Device::upload`], [`Device::write`]).
pub const UPLOAD: &str = "upload (host → device)";
/// The profile's row of device-to-host copies ([`Device::download`]).
pub const DOWNLOAD: &str = "download (device → host, waits)";

/// SMs of the GPU the emulator answers [`Device::resident_blocks`] as (an H100 SXM).
pub const EMU_SMS: usize = 132;
/// Blocks of any kernel one SM holds, as the emulator answers
/// [`Device::resident_blocks`].
pub const EMU_BLOCKS_PER_SM: usize = 4;

/// A device to allocate on and launch kernels on.
pub struct Device {
    inner: DevInner,
    htod: std::sync::atomic::AtomicU64,
    dtoh: std::sync::atomic::AtomicU64,
    profiler: Profiler,
}

enum DevInner {
    Emu {
        max_workers: u32,
    },
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaDev),
}

extern "C" {
    fn popen_emu_block_fits(name: *const c_char, threads: u32, shmem: u32) -> i32;
    fn popen_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        shmem: u32,
        args: *mut *mut c_void,
        nargs: usize,
        arg_sizes: *const usize,
        max_workers: u32,
        err: *mut c_char,
        errlen: usize,
    ) -> i32;
}

impl Device {
    fn with_inner(inner: DevInner) -> Device {
        Device {
            inner,
            htod: Default::default(),
            dtoh: Default::default(),
            profiler: Profiler::default(),
        }
    }

    pub(crate) fn profiler(&self) -> &Profiler {
        &self.profiler
    }

    /// A timing mark on the device's queue (see [`super::profile`]).
    fn mark(&self) -> Result<Start> {
        match &self.inner {
            DevInner::Emu { .. } => Ok(Start::Host(std::time::Instant::now())),
            #[cfg(feature = "cuda")]
            DevInner::Cuda(c) => c
                .stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map(Start::Cuda)
                .map_err(|e| Error::Device(format!("profile event: {e}"))),
        }
    }

    /// `f`, timed under `name` when profiling is on.
    pub(crate) fn profiled<R>(
        &self,
        name: impl FnOnce() -> String,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        if !self.profiler.on() {
            return f();
        }
        let start = self.mark()?;
        let r = f()?;
        let end = self.mark()?;
        self.profiler.finish(name(), start, end);
        Ok(r)
    }

    /// Host↔device copies made so far (uploads and writes, downloads).
    pub fn copies(&self) -> CopyCount {
        use std::sync::atomic::Ordering::Relaxed;
        CopyCount {
            htod: self.htod.load(Relaxed),
            dtoh: self.dtoh.load(Relaxed),
        }
    }

    fn count(&self, htod: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if htod { &self.htod } else { &self.dtoh }.fetch_add(1, Relaxed);
    }

    /// The CUDA emulator, using every host core for blocks.
    pub fn emulator() -> Device {
        Device::with_inner(DevInner::Emu { max_workers: 0 })
    }
    /// The emulator with at most `n` host threads running blocks (1 = blocks in order).
    pub fn emulator_with_workers(n: u32) -> Device {
        Device::with_inner(DevInner::Emu {
            max_workers: n.max(1),
        })
    }

    /// GPU `ordinal` through cudarc.  An error (never a panic) when the crate was built
    /// without the `cuda` feature or without nvcc, or when no driver is present.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        {
            Ok(Device::with_inner(DevInner::Cuda(cuda::CudaDev::new(
                ordinal,
            )?)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ordinal;
            Err(Error::Unsupported(
                "popen was built without the `cuda` feature".into(),
            ))
        }
    }

    /// The devices the tests run on: always the emulator, plus GPU 0 as
    /// `POPEN_TEST_CUDA` says (see [`Device::test_devices_with`]).
    ///
    /// # Panics
    /// With `POPEN_TEST_CUDA=1` when GPU 0 cannot be opened: a test run that asked for
    /// the GPU must fail rather than pass on the emulator alone.
    #[track_caller]
    pub fn test_devices() -> Vec<Device> {
        let setting = std::env::var("POPEN_TEST_CUDA").ok();
        match Device::test_devices_with(setting.as_deref(), || Device::cuda(0)) {
            Ok(v) => v,
            Err(e) => panic!("POPEN_TEST_CUDA=1 asks for GPU 0, which cannot be opened: {e}"),
        }
    }

    /// The test devices for a `POPEN_TEST_CUDA` setting: `"0"` the emulator only; `"1"`
    /// the emulator and the GPU that `cuda` opens, an error when it fails; unset (or
    /// anything else) the emulator, plus that GPU when it opens.
    pub fn test_devices_with(
        setting: Option<&str>,
        cuda: impl FnOnce() -> Result<Device>,
    ) -> Result<Vec<Device>> {
        let mut v = vec![Device::emulator()];
        match setting {
            Some("0") => {}
            Some("1") => v.push(cuda()?),
            _ => v.extend(cuda().ok()),
        }
        Ok(v)
    }

    /// Which kind of device this is.
    pub fn kind(&self) -> DeviceKind {
        match &self.inner {
            DevInner::Emu { .. } => DeviceKind::Emulator,
            #[cfg(feature = "cuda")]
            DevInner::Cuda(_) => DeviceKind::Cuda,
        }
    }

    /// Copy host data to a new device buffer.  Profiled as `upload (host → device)`.
    pub fn upload<T: Elem>(&self, data: &[T]) -> Result<DeviceBuf<T>> {
        self.count(true);
        self.profiled(
            || UPLOAD.into(),
            || match &self.inner {
                DevInner::Emu { .. } => Ok(DeviceBuf {
                    len: data.len(),
                    inner: BufInner::Host(data.to_vec()),
                }),
                #[cfg(feature = "cuda")]
                DevInner::Cuda(c) => c.upload(data),
            },
        )
    }

    /// A new zero-filled device buffer.  Profiled (see [`Device::set_profiling`]) as
    /// `zeros (alloc + memset)`: on a GPU the fill is a memset on the stream, which costs
    /// the host a driver call as a launch does; [`Device::uninit`] makes none.
    pub fn zeros<T: Elem>(&self, n: usize) -> Result<DeviceBuf<T>> {
        self.profiled(
            || "zeros (alloc + memset)".into(),
            || match &self.inner {
                DevInner::Emu { .. } => Ok(DeviceBuf {
                    len: n,
                    inner: BufInner::Host(vec![T::zeroed(); n]),
                }),
                #[cfg(feature = "cuda")]
                DevInner::Cuda(c) => c.zeros(n),
            },
        )
    }

    /// A new device buffer whose contents are unspecified, for a kernel that writes every
    /// element before anything reads it (scratch, partials, outputs overwritten whole):
    /// a GPU skips the memset [`Device::zeros`] makes.  The emulator fills it with
    /// [`UNINIT_BYTE`] bytes (NaN as `f32`/`f64`, the largest value as an unsigned
    /// integer, −1 as a signed one), so a kernel that reads an element it never wrote
    /// shows up in the tests.
    pub fn uninit<T: Elem>(&self, n: usize) -> Result<DeviceBuf<T>> {
        match &self.inner {
            DevInner::Emu { .. } => {
                let mut v = vec![T::zeroed(); n];
                bytemuck::cast_slice_mut::<T, u8>(&mut v).fill(UNINIT_BYTE);
                Ok(DeviceBuf {
                    len: n,
                    inner: BufInner::Host(v),
                })
            }
            #[cfg(feature = "cuda")]
            DevInner::Cuda(c) => c.uninit(n),
        }
    }

    /// Copy a device buffer back to the host (synchronizes).  Profiled as `download
    /// (device → host, waits)`: the host waits for every launch before it.
    pub fn download<T: Elem>(&self, buf: &DeviceBuf<T>) -> Result<Vec<T>> {
        self.count(false);
        self.profiled(
            || DOWNLOAD.into(),
            || match &buf.inner {
                BufInner::Host(v) => Ok(v.clone()),
                #[cfg(feature = "cuda")]
                BufInner::Cuda(s, st) => {
                    let mut v = st
                        .clone_dtoh(s)
                        .map_err(|e| Error::Device(format!("download: {e}")))?;
                    v.truncate(buf.len);
                    Ok(v)
                }
            },
        )
    }

    /// Overwrite a device buffer from host data of the same length.  Profiled as
    /// `upload (host → device)`, as [`Device::upload`] is.
    pub fn write<T: Elem>(&self, buf: &mut DeviceBuf<T>, data: &[T]) -> Result<()> {
        crate::error::check_len("Device::write", "data", data.len(), buf.len())?;
        self.count(true);
        self.profiled(
            || UPLOAD.into(),
            || match &mut buf.inner {
                BufInner::Host(v) => {
                    v.copy_from_slice(data);
                    Ok(())
                }
                #[cfg(feature = "cuda")]
                BufInner::Cuda(s, st) => {
                    if data.is_empty() {
                        return Ok(());
                    }
                    st.memcpy_htod(data, s)
                        .map_err(|e| Error::Device(format!("write: {e}")))
                }
            },
        )
    }

    /// Row-major `out[i] (M,N) (=|+=) op(a[i]) · op(b[i])` for `batch` products stored
    /// one after another, with cuBLAS on a GPU (strided batched when `batch` > 1); an
    /// error on the emulator (whose products are the CPU backend's, see
    /// `backend::device::gemm`).  Lengths must already match batch × (M,K), (K,N), (M,N);
    /// `m`, `n`, `batch` ≥ 1.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cublas_sgemm(
        &self,
        mkn: [usize; 3],
        ta: bool,
        tb: bool,
        batch: usize,
        a: &DeviceBuf<f32>,
        b: &DeviceBuf<f32>,
        out: &mut DeviceBuf<f32>,
        add: bool,
    ) -> Result<()> {
        match &self.inner {
            DevInner::Emu { .. } => {
                let _ = (mkn, ta, tb, batch, a, b, out, add);
                Err(Error::Unsupported("cuBLAS on the emulator".into()))
            }
            #[cfg(feature = "cuda")]
            DevInner::Cuda(c) => self.profiled(
                || super::profile::sgemm_name(mkn, ta, tb, batch),
                || c.sgemm(mkn, ta, tb, batch, a, b, out, add),
            ),
        }
    }

    /// Wait for all launched work (a no-op on the emulator, which runs synchronously).
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner {
            DevInner::Emu { .. } => Ok(()),
            #[cfg(feature = "cuda")]
            DevInner::Cuda(c) => c
                .stream
                .synchronize()
                .map_err(|e| Error::Device(format!("synchronize: {e}"))),
        }
    }

    /// How many blocks of kernel `name` (`threads` per block, `shmem` bytes of dynamic
    /// shared memory) the device runs at once: its SMs × the blocks of that kernel one SM
    /// holds (the driver's occupancy, which counts the kernel's registers).  A grid of
    /// this many blocks is one full wave; one block more starts a second wave that runs
    /// on a few SMs while the rest wait.  The emulator answers as a GPU of
    /// [`EMU_SMS`] SMs holding [`EMU_BLOCKS_PER_SM`] blocks each, so that the tests run
    /// the grids a GPU would.  An error for an unknown kernel or a block no SM can hold.
    pub fn resident_blocks(&self, name: &str, threads: u32, shmem: u32) -> Result<usize> {
        let unknown = || Error::Device(format!("no kernel named {name}"));
        let too_big = || {
            Error::Device(format!(
                "{name}: no SM holds a block of {threads} threads and {shmem} bytes of \
                 dynamic shared memory"
            ))
        };
        match &self.inner {
            DevInner::Emu { .. } => {
                let cname = CString::new(name).map_err(|_| unknown())?;
                // SAFETY: reads the NUL-terminated name only.
                match unsafe { popen_emu_block_fits(cname.as_ptr(), threads, shmem) } {
                    1 => Ok(EMU_SMS * EMU_BLOCKS_PER_SM),
                    0 => Err(too_big()),
                    _ => Err(unknown()),
                }
            }
            #[cfg(feature = "cuda")]
            DevInner::Cuda(c) => match c.resident_blocks(name, threads, shmem)? {
                None => Err(unknown()),
                Some(0) => Err(too_big()),
                Some(n) => Ok(n),
            },
        }
    }

    /// Launch kernel `name` (an `extern "C" __global__` function in `kernels/*.cu`).
    ///
    /// On the emulator the argument count and each argument's size are checked against
    /// the kernel's C++ signature, so a wrapper that passes arguments in the wrong
    /// number or width fails loudly in CI rather than on the GPU.
    pub fn launch(&self, name: &str, cfg: LaunchCfg, args: &[KArg]) -> Result<()> {
        self.profiled(|| name.to_string(), || self.launch_now(name, cfg, args))
    }

    fn launch_now(&self, name: &str, cfg: LaunchCfg, args: &[KArg]) -> Result<()> {
        match &self.inner {
            DevInner::Emu { max_workers } => {
                let mut raw: Vec<[u8; 8]> = Vec::with_capacity(args.len());
                let mut sizes = Vec::with_capacity(args.len());
                for a in args {
                    let (b, n) = a.raw();
                    raw.push(b);
                    sizes.push(n);
                }
                let mut ptrs: Vec<*mut c_void> = raw
                    .iter_mut()
                    .map(|b| b.as_mut_ptr() as *mut c_void)
                    .collect();
                let cname = CString::new(name)
                    .map_err(|_| Error::arg("launch", "kernel name has a NUL byte"))?;
                let mut err = vec![0u8; 512];
                // SAFETY: the emulator reads `nargs` pointers, each to at least the
                // size we pass for it (checked against the kernel signature before any
                // call), and writes at most `errlen` bytes to `err`.  Buffer pointers
                // come from live `DeviceBuf`s borrowed by the caller for this call.
                let rc = unsafe {
                    popen_emu_launch(
                        cname.as_ptr(),
                        cfg.grid.as_ptr(),
                        cfg.block.as_ptr(),
                        cfg.shmem,
                        ptrs.as_mut_ptr(),
                        ptrs.len(),
                        sizes.as_ptr(),
                        *max_workers,
                        err.as_mut_ptr() as *mut c_char,
                        err.len(),
                    )
                };
                if rc != 0 {
                    let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
                    return Err(Error::Device(
                        String::from_utf8_lossy(&err[..end]).into_owned(),
                    ));
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            DevInner::Cuda(c) => c.launch(name, cfg, args),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.kind())
    }
}

#[cfg(feature = "cuda")]
mod cuda;
