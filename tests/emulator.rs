//! The CUDA emulator itself: barriers, early returns, shuffles, dynamic shared memory,
//! atomics across concurrent blocks, argument checking, deadlock reporting.
use popen::kernels::{Device, DeviceKind, KArg, LaunchCfg};

#[test]
fn rowsum_uses_shared_memory_and_shuffles() {
    // the self-test kernels are built for the emulator alone (not in the GPU's PTX)
    let dev = Device::emulator();
    // odd sizes: 37 rows of 1000, blocks of 3, 5 and 32 warps
    for block in [96u32, 160, 1024] {
        let (rows, n) = (37usize, 1000usize);
        let x: Vec<f32> = (0..rows * n)
            .map(|i| ((i * 7919) % 1013) as f32 * 0.01 - 3.0)
            .collect();
        let xd = dev.upload(&x).unwrap();
        let mut out = dev.zeros::<f32>(rows).unwrap();
        dev.launch(
            "emu_selftest_rowsum_f32",
            LaunchCfg::new([rows as u32, 1, 1], [block, 1, 1], 0),
            &[out.arg_mut(), xd.arg(), KArg::I32(n as i32)],
        )
        .unwrap();
        let got = dev.download(&out).unwrap();
        for r in 0..rows {
            let want: f64 = x[r * n..(r + 1) * n].iter().map(|&v| v as f64).sum();
            assert!(
                (got[r] as f64 - want).abs() < 1e-2,
                "{dev:?} block {block} row {r}: {} vs {want}",
                got[r]
            );
        }
    }
}

#[test]
fn early_return_before_barrier_does_not_deadlock() {
    let dev = Device::emulator();
    let mut out = dev.zeros::<i32>(5).unwrap();
    dev.launch(
        "emu_selftest_early_return",
        LaunchCfg::new([5, 1, 1], [128, 1, 1], 128 * 4),
        &[out.arg_mut(), KArg::I32(77)],
    )
    .unwrap();
    let got = dev.download(&out).unwrap();
    for (b, g) in got.iter().enumerate() {
        let want: i32 = (0..77).map(|t| t + b as i32).sum();
        assert_eq!(*g, want);
    }
}

#[test]
fn atomics_across_blocks_are_exact() {
    // the self-test kernels are built for the emulator alone (not in the GPU's PTX)
    let dev = Device::emulator();
    let n = 100_003usize;
    let x: Vec<i32> = (0..n as i32)
        .map(|i| i.wrapping_mul(2654435761u32 as i32).abs())
        .collect();
    let xd = dev.upload(&x).unwrap();
    let mut c = dev.zeros::<u32>(7).unwrap();
    dev.launch(
        "emu_selftest_histogram",
        LaunchCfg::linear(n, 256),
        &[c.arg_mut(), xd.arg(), KArg::I32(n as i32), KArg::I32(7)],
    )
    .unwrap();
    let got = dev.download(&c).unwrap();
    let mut want = vec![0u32; 7];
    for v in &x {
        want[(*v % 7) as usize] += 1;
    }
    assert_eq!(got, want);
}

#[test]
fn wrong_argument_count_or_width_is_an_error() {
    let dev = Device::emulator();
    let x = dev.upload(&[1.0f32; 4]).unwrap();
    let mut y = dev.zeros::<f32>(4).unwrap();
    let e = dev
        .launch(
            "scale_f32",
            LaunchCfg::linear(4, 32),
            &[y.arg_mut(), x.arg(), KArg::F32(2.0)],
        )
        .unwrap_err();
    assert!(e.to_string().contains("3 arguments, kernel takes 4"), "{e}");
    let e = dev
        .launch(
            "scale_f32",
            LaunchCfg::linear(4, 32),
            &[y.arg_mut(), x.arg(), KArg::F32(2.0), KArg::I32(4)],
        )
        .unwrap_err();
    assert!(e.to_string().contains("argument 3 has 4 bytes"), "{e}");
    let e = dev
        .launch("no_such_kernel", LaunchCfg::linear(4, 32), &[])
        .unwrap_err();
    assert!(e.to_string().contains("no kernel named"), "{e}");
    let e = dev
        .launch(
            "scale_f32",
            LaunchCfg::linear(4, 2048),
            &[y.arg_mut(), x.arg(), KArg::F32(2.0), KArg::I64(4)],
        )
        .unwrap_err();
    assert!(e.to_string().contains("1..=1024"), "{e}");
}

#[test]
fn divergent_barriers_are_reported_as_deadlock() {
    let dev = Device::emulator();
    let mut y = dev.zeros::<f32>(1).unwrap();
    let e = dev
        .launch(
            "emu_selftest_deadlock",
            LaunchCfg::new([1, 1, 1], [64, 1, 1], 0),
            &[y.arg_mut()],
        )
        .unwrap_err();
    assert!(e.to_string().contains("deadlock"), "{e}");
}

#[test]
fn every_kernel_file_is_in_the_table() {
    // build.rs parses kernels/*.cu for the crate's kernels and kernels/emu/selftest.cu for
    // the emulator's own, which stay out of the production list (and out of the PTX).
    let names: Vec<&str> = popen::kernels::KERNELS.iter().map(|(k, _)| *k).collect();
    for k in ["scale_f32", "attention_fwd_f32"] {
        assert!(names.contains(&k), "{k} missing from {names:?}");
    }
    let selftests = popen::kernels::EMU_SELFTEST_KERNELS;
    for k in ["emu_selftest_rowsum_f32", "emu_selftest_deadlock"] {
        assert!(selftests.contains(&k), "{k} missing from {selftests:?}");
    }
    for k in &names {
        assert!(
            !k.starts_with("emu_selftest"),
            "{k} is a self-test among the kernels"
        );
    }
}

/// Every `.rs` file under `dir`, recursively.
fn rust_sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_listed_kernel_is_named_by_a_launch_in_src_or_tests() {
    // A kernel is launched by name, so one that no source names as a string literal is
    // never launched: dead code that no test checks.  (That the naming wrapper is itself
    // tested is up to each family's test file.)
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_sources(&root.join("src"), &mut files);
    rust_sources(&root.join("tests"), &mut files);
    let text: String = files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let names = popen::kernels::KERNELS.iter().map(|(k, _)| *k);
    let missing: Vec<&str> = names
        .chain(popen::kernels::EMU_SELFTEST_KERNELS.iter().copied())
        .filter(|k| !text.contains(&format!("\"{k}\"")))
        .collect();
    assert!(
        missing.is_empty(),
        "kernels no source launches: {missing:?}"
    );
}

#[test]
fn popen_test_cuda_1_fails_when_the_gpu_cannot_be_opened() {
    let no_gpu = || Err(popen::error::Error::Unsupported("no GPU here".into()));
    let e = Device::test_devices_with(Some("1"), no_gpu).unwrap_err();
    assert!(e.to_string().contains("no GPU here"), "{e}");
    // unset: the emulator alone; "0": the GPU is not even tried
    assert_eq!(Device::test_devices_with(None, no_gpu).unwrap().len(), 1);
    let tried = std::cell::Cell::new(false);
    let v = Device::test_devices_with(Some("0"), || {
        tried.set(true);
        no_gpu()
    })
    .unwrap();
    assert_eq!((v.len(), tried.get()), (1, false));
}

#[test]
fn shuffle_from_a_lane_that_does_not_exist_is_an_error() {
    // A block of 33 threads: the second warp has one lane, whose xor-shuffles read
    // lanes beyond blockDim — undefined on the GPU, so the emulator refuses.
    let dev = Device::emulator();
    let x = dev.upload(&vec![1.0f32; 100]).unwrap();
    let mut out = dev.zeros::<f32>(1).unwrap();
    let e = dev
        .launch(
            "emu_selftest_rowsum_f32",
            LaunchCfg::new([1, 1, 1], [33, 1, 1], 0),
            &[out.arg_mut(), x.arg(), KArg::I32(100)],
        )
        .unwrap_err();
    assert!(e.to_string().contains("did not take part"), "{e}");
}

#[test]
fn shared_memory_no_thread_wrote_reads_as_nan() {
    // Static and dynamic shared memory are NaN-filled before every block: threads past
    // `written` read NaN, also in blocks after the first (not the previous block's data)
    // and in a launch after one that wrote them all (the emulator keeps a worker's
    // shared memory between launches).
    let dev = Device::emulator();
    let (blocks, threads, written) = (3usize, 96usize, 61);
    let mut out = dev.zeros::<f32>(blocks * threads).unwrap();
    for w in [threads, written] {
        dev.launch(
            "emu_selftest_uninit_shared",
            LaunchCfg::new([blocks as u32, 1, 1], [threads as u32, 1, 1], 256 * 4),
            &[out.arg_mut(), KArg::I32(w as i32)],
        )
        .unwrap();
    }
    let got = dev.download(&out).unwrap();
    for b in 0..blocks {
        for t in 0..threads {
            let g = got[b * threads + t];
            if t < written {
                assert_eq!(g, 2.0 * t as f32, "block {b} thread {t}");
            } else {
                assert!(
                    g.is_nan(),
                    "block {b} thread {t} read {g}, not the NaN fill"
                );
            }
        }
    }
}

#[test]
fn threads_at_two_different_barriers_are_an_error() {
    let dev = Device::emulator();
    let mut out = dev.zeros::<f32>(64).unwrap();
    let e = dev
        .launch(
            "emu_selftest_two_barriers",
            LaunchCfg::new([2, 1, 1], [64, 1, 1], 0),
            &[out.arg_mut()],
        )
        .unwrap_err();
    assert!(e.to_string().contains("two different __syncthreads"), "{e}");
}

/// A write past the dynamic shared memory a launch asked for is an error, whether it
/// lands just past the end (checked after each block) or far past it (checked when the
/// launch is done); a write inside it is not.
#[test]
fn write_past_dynamic_shared_memory_is_an_error() {
    let dev = Device::emulator();
    let mut out = dev.zeros::<f32>(1).unwrap();
    let mut write = |i: i32, floats: u32| {
        let cfg = LaunchCfg::new([3, 1, 1], [32, 1, 1], 4 * floats);
        let r = dev.launch(
            "emu_selftest_dyn_shared_write",
            cfg,
            &[out.arg_mut(), KArg::I32(i)],
        );
        r.map_err(|e| e.to_string())
    };
    write(9, 10).unwrap();
    // a write far into a larger launch's memory is not found by a later, smaller launch
    // that is given the same memory
    write(1000, 2000).unwrap();
    write(9, 10).unwrap();
    // who: the block, when the write is within 4 KiB of the end; else found at the end
    let cases = [
        (10, 10, "block ("),
        (0, 0, "block ("),
        (9000, 10, "a block"),
    ];
    for (i, floats, who) in cases {
        let e = write(i, floats).unwrap_err();
        let byte = 4 * i;
        let past = format!(
            "byte {byte} of dynamic shared memory, past the {} bytes",
            4 * floats
        );
        assert!(
            e.contains(&past) && e.contains(who),
            "float {i} of {floats}: {e}"
        );
    }
    assert_eq!(dev.download(&out).unwrap(), [1.0]);
}

/// A write past the end of a static shared array is an error (on the GPU it lands in
/// the next array, silently); the last element is not.
#[test]
fn write_past_a_static_shared_array_is_an_error() {
    let dev = Device::emulator();
    let mut out = dev.zeros::<f32>(1).unwrap();
    let mut write = |i: i32| {
        let cfg = LaunchCfg::new([2, 1, 1], [32, 1, 1], 0);
        let r = dev.launch(
            "emu_selftest_static_shared_write",
            cfg,
            &[out.arg_mut(), KArg::I32(i)],
        );
        r.map_err(|e| e.to_string())
    };
    write(7).unwrap();
    for i in [8, 20] {
        let e = write(i).unwrap_err();
        let past = format!("wrote byte {} of its static shared array 0", 4 * i);
        assert!(
            e.contains(&past) && e.contains("32 bytes"),
            "float {i}: {e}"
        );
    }
    assert_eq!(dev.download(&out).unwrap(), [3.0]);
}

#[test]
fn misaligned_float4_is_an_error_and_aligned_is_not() {
    let dev = Device::emulator();
    let x = dev
        .upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
        .unwrap();
    let mut out = dev.zeros::<f32>(4).unwrap();
    let cfg = LaunchCfg::new([1, 1, 1], [32, 1, 1], 0);
    dev.launch(
        "emu_selftest_float4_load",
        cfg,
        &[out.arg_mut(), x.arg(), KArg::I32(4)],
    )
    .unwrap();
    assert_eq!(dev.download(&out).unwrap(), [5.0, 6.0, 7.0, 8.0]);
    let e = dev
        .launch(
            "emu_selftest_float4_load",
            cfg,
            &[out.arg_mut(), x.arg(), KArg::I32(1)],
        )
        .unwrap_err();
    assert!(e.to_string().contains("misaligned float4 load"), "{e}");
}

/// `Device::uninit` on the emulator is poisoned, so a kernel reading what it never
/// wrote gives NaN (floats) or the largest value (unsigned) in the tests.
#[test]
fn uninit_buffers_are_poisoned_on_the_emulator() {
    let dev = Device::emulator();
    let f = dev.download(&dev.uninit::<f32>(7).unwrap()).unwrap();
    assert!(f.len() == 7 && f.iter().all(|x| x.is_nan()), "{f:?}");
    let u = dev.download(&dev.uninit::<u32>(3).unwrap()).unwrap();
    assert_eq!(u, vec![u32::MAX; 3]);
    assert!(dev.uninit::<u8>(0).unwrap().is_empty());
}

/// `Device::resident_blocks`: one wave of a kernel's blocks (the emulator answers as
/// an H100 holding 4 blocks per SM); an unknown kernel or a block no SM can hold is an
/// error, on every test device.
#[test]
fn resident_blocks_is_a_wave_and_bad_blocks_are_errors() {
    use popen::kernels::{EMU_BLOCKS_PER_SM, EMU_SMS};
    for dev in Device::test_devices() {
        let wave = dev.resident_blocks("mask_pair_part_u8", 256, 0).unwrap();
        if dev.kind() == DeviceKind::Emulator {
            assert_eq!(wave, EMU_SMS * EMU_BLOCKS_PER_SM);
        }
        assert!(wave >= 1, "{dev:?}: {wave}");
        let e = dev.resident_blocks("no_such_kernel", 256, 0).unwrap_err();
        assert!(e.to_string().contains("no kernel named"), "{dev:?}: {e}");
        assert!(dev.resident_blocks("mask_pair_part_u8", 2048, 0).is_err());
        assert!(dev
            .resident_blocks("mask_pair_part_u8", 256, 300 * 1024)
            .is_err());
    }
    let e = Device::emulator()
        .resident_blocks("mask_pair_part_u8", 0, 0)
        .unwrap_err();
    assert!(e.to_string().contains("no SM holds"), "{e}");
}
