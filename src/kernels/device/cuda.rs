//! The cudarc side of [`Device`]: a context, a stream, the PTX module's functions and a
//! cuBLAS handle.
use super::*;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

pub(super) struct CudaDev {
    pub(super) stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    /// The cuBLAS handle, made on the first product (a machine without libcublas
    /// can still launch the crate's own kernels).
    blas: std::sync::Mutex<Option<Arc<cudarc::cublas::CudaBlas>>>,
    /// Streaming multiprocessors.
    sms: usize,
    _ctx: Arc<CudaContext>,
}

/// Let the device's default memory pool keep what buffers free (release threshold
/// `u64::MAX`).  With the driver's default of 0 the pool hands its memory back at
/// every synchronize, and the next step's allocations map it again.  A pool that
/// refuses keeps the default: slower, not wrong.
fn keep_pool_memory(ctx: &CudaContext) {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() {
        return;
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` is written by the driver for a device the context opened;
    // the attribute takes a pointer to a u64 that outlives the call.
    unsafe {
        if sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) == sys::CUresult::CUDA_SUCCESS
        {
            let _ = sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            );
        }
    }
}

fn derr(what: &str, e: impl fmt::Display) -> Error {
    Error::Device(format!("{what}: {e}"))
}

/// Opt kernel `f` in to `shmem` bytes of dynamic shared memory (above 48 KiB a
/// kernel must ask).
fn allow_shared(f: &CudaFunction, shmem: u32) -> Result<()> {
    if shmem > 48 * 1024 {
        f.set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shmem as i32,
        )
        .map_err(|e| derr("set shared memory", e))?;
    }
    Ok(())
}

impl CudaDev {
    pub(super) fn new(ordinal: usize) -> Result<Self> {
        // cudarc panics when libcuda is missing; ask first.
        // SAFETY: only probes for the shared library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Device(
                "no CUDA driver (libcuda) on this machine".into(),
            ));
        }
        if crate::kernels::PTX.is_empty() {
            return Err(Error::Device(
                "popen was built without kernels (nvcc not found at build time; see tools/install_nvcc.sh)".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| derr("CudaContext::new", e))?;
        // SAFETY: every buffer, launch, copy and cuBLAS call of this device goes to
        // its one stream, in order, so cudarc's per-buffer events (two created per
        // allocation, recorded at each use) order nothing that the stream does not.
        unsafe { ctx.disable_event_tracking() };
        keep_pool_memory(&ctx);
        let stream = ctx.default_stream();
        let mut funcs = HashMap::new();
        for (stem, ptx) in crate::kernels::PTX {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(*ptx))
                .map_err(|e| derr(&format!("loading {stem}.ptx"), e))?;
            for (k, file) in crate::kernels::KERNELS {
                if file == stem {
                    let f = m
                        .load_function(k)
                        .map_err(|e| derr(&format!("function {k}"), e))?;
                    funcs.insert(*k, f);
                }
            }
        }
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| derr("SM count", e))?;
        Ok(CudaDev {
            stream,
            funcs,
            blas: std::sync::Mutex::new(None),
            sms: sms.max(1) as usize,
            _ctx: ctx,
        })
    }

    fn blas(&self) -> Result<Arc<cudarc::cublas::CudaBlas>> {
        let mut g = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = g.as_ref() {
            return Ok(b.clone());
        }
        // SAFETY: only probes for the shared library (cudarc panics without it).
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::Device(
                "no cuBLAS (libcublas) on this machine".into(),
            ));
        }
        let b = Arc::new(
            cudarc::cublas::CudaBlas::new(self.stream.clone())
                .map_err(|e| derr("cuBLAS handle", e))?,
        );
        *g = Some(b.clone());
        Ok(b)
    }

    /// Row-major `out (M,N) (=|+=) op(a) · op(b)` with one cuBLAS SGEMM.
    ///
    /// cuBLAS is column-major, and a row-major (r,c) buffer is the column-major
    /// (c,r) transpose, so the call computes `outᵀ = op(b)ᵀ · op(a)ᵀ`: b first, a
    /// second, each transposed in cuBLAS exactly when it is transposed here.
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sgemm(
        &self,
        [m, k, n]: [usize; 3],
        ta: bool,
        tb: bool,
        batch: usize,
        a: &DeviceBuf<f32>,
        b: &DeviceBuf<f32>,
        out: &mut DeviceBuf<f32>,
        add: bool,
    ) -> Result<()> {
        use cudarc::cublas::{
            sys::cublasOperation_t as Op, Gemm, GemmConfig, StridedBatchedConfig,
        };
        let int = |x: usize| {
            i32::try_from(x)
                .map_err(|_| Error::shape("matmul", format!("{x} does not fit cuBLAS's int")))
        };
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let (BufInner::Cuda(sa, _), BufInner::Cuda(sb, _), BufInner::Cuda(so, _)) =
            (&a.inner, &b.inner, &mut out.inner)
        else {
            return Err(Error::Device("matmul: a buffer is not on this GPU".into()));
        };
        let cfg = GemmConfig {
            transa: op(tb),
            transb: op(ta),
            m: int(n)?,
            n: int(m)?,
            k: int(k)?,
            alpha: 1.0f32,
            // row stride of the stored b and a
            lda: int(if tb { k } else { n })?,
            ldb: int(if ta { m } else { k })?,
            beta: if add { 1.0 } else { 0.0 },
            ldc: int(n)?,
        };
        let blas = self.blas()?;
        if batch == 1 {
            // SAFETY: the lengths were checked against (M,K), (K,N), (M,N) by the
            // caller (`backend::device::gemm`), and the leading dimensions above are
            // those of the stored row-major buffers, so cuBLAS stays inside each buffer.
            return unsafe { blas.gemm(cfg, sb, sa, so) }.map_err(|e| derr("cuBLAS sgemm", e));
        }
        // cuBLAS's A is our b, its B our a (the column-major view above); each
        // product's operands follow the last one's
        let stride = |x: usize| {
            i64::try_from(x)
                .map_err(|_| Error::shape("matmul", format!("{x} does not fit cuBLAS's stride")))
        };
        let cfg = StridedBatchedConfig {
            gemm: cfg,
            batch_size: int(batch)?,
            stride_a: stride(k * n)?,
            stride_b: stride(m * k)?,
            stride_c: stride(m * n)?,
        };
        // SAFETY: as above, for each of the `batch` products, whose lengths the caller
        // checked against batch × (M,K), (K,N), (M,N).
        unsafe { blas.gemm_strided_batched(cfg, sb, sa, so) }
            .map_err(|e| derr("cuBLAS sgemm strided batched", e))
    }

    pub(super) fn upload<T: Elem>(&self, data: &[T]) -> Result<DeviceBuf<T>> {
        if data.is_empty() {
            return self.zeros(0);
        }
        let s = self
            .stream
            .clone_htod(data)
            .map_err(|e| derr("upload", e))?;
        Ok(DeviceBuf {
            len: data.len(),
            inner: BufInner::Cuda(s, self.stream.clone()),
        })
    }

    pub(super) fn zeros<T: Elem>(&self, n: usize) -> Result<DeviceBuf<T>> {
        // CUDA cannot allocate 0 bytes; keep one element and the true length.
        let s = self
            .stream
            .alloc_zeros::<T>(n.max(1))
            .map_err(|e| derr("alloc", e))?;
        Ok(DeviceBuf {
            len: n,
            inner: BufInner::Cuda(s, self.stream.clone()),
        })
    }

    pub(super) fn uninit<T: Elem>(&self, n: usize) -> Result<DeviceBuf<T>> {
        // SAFETY: the buffer's contents are unspecified until a kernel writes them;
        // `Device::uninit`'s contract makes its callers write every element before
        // reading (the emulator's poisoned fill checks that in the tests).
        let s = unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(|e| derr("alloc", e))?;
        Ok(DeviceBuf {
            len: n,
            inner: BufInner::Cuda(s, self.stream.clone()),
        })
    }

    /// SMs × blocks per SM of kernel `name`; None for an unknown kernel.
    pub(super) fn resident_blocks(
        &self,
        name: &str,
        threads: u32,
        shmem: u32,
    ) -> Result<Option<usize>> {
        let Some(f) = self.funcs.get(name) else {
            return Ok(None);
        };
        allow_shared(f, shmem)?;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(threads, shmem as usize, None)
            .map_err(|e| derr(&format!("occupancy of {name}"), e))?;
        Ok(Some(self.sms * per_sm as usize))
    }

    pub(super) fn launch(&self, name: &str, cfg: LaunchCfg, args: &[KArg]) -> Result<()> {
        let f = self
            .funcs
            .get(name)
            .ok_or_else(|| Error::Device(format!("no kernel named {name} in the PTX")))?;
        allow_shared(f, cfg.shmem)?;
        let vals: Vec<KArg> = args.to_vec();
        let mut b = self.stream.launch_builder(f);
        for a in &vals {
            match a {
                KArg::Ptr(v) | KArg::U64(v) => b.arg(v),
                KArg::I64(v) => b.arg(v),
                KArg::I32(v) => b.arg(v),
                KArg::U32(v) => b.arg(v),
                KArg::F32(v) => b.arg(v),
            };
        }
        let lc = LaunchConfig {
            grid_dim: (cfg.grid[0], cfg.grid[1], cfg.grid[2]),
            block_dim: (cfg.block[0], cfg.block[1], cfg.block[2]),
            shared_mem_bytes: cfg.shmem,
        };
        // SAFETY: argument count and widths follow the kernel signature (checked
        // by the emulator in every CI run for the same wrappers); pointers are live
        // device buffers borrowed by the caller.
        unsafe { b.launch(lc) }.map_err(|e| derr(&format!("launch {name}"), e))?;
        Ok(())
    }
}
