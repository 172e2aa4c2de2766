//! Builds the kernels in `kernels/*.cu` two ways:
//!
//! 1. Always: with the host C++ compiler against the CUDA emulator
//!    (`kernels/emu/`), into a static library the tests and the emulated device call.
//!    A trampoline per kernel reads the argument array that `cuLaunchKernel` takes, so
//!    one launch interface serves both the emulator and cudarc.
//! 2. When nvcc is found (`$NVCC`, `$CUDA_HOME/bin/nvcc`, then `PATH`): to PTX for
//!    `sm_$CUDA_COMPUTE_CAP` (default 90), then ptxas on the PTX for the
//!    register/spill report.  A kernel that does not compile fails the build; a spill
//!    is a build warning; the report is written to `$OUT_DIR/ptxas-report.txt` and its
//!    text embedded as `popen::kernels::PTXAS_REPORT`.  Without nvcc the crate still
//!    builds and the CUDA backend reports at run time that it has no kernels.
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The emulator's self-test kernels, relative to `kernels/`.
const EMU_SELFTEST: &str = "emu/selftest.cu";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = manifest.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for v in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_COMPUTE_CAP",
        "POPEN_SKIP_NVCC",
        "POPEN_EMU_SANITIZE",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let mut files: Vec<PathBuf> = fs::read_dir(&kdir)
        .expect("kernels/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();

    let mut table: Vec<(String, String)> = Vec::new(); // (kernel, module stem)
    for f in &files {
        let src = fs::read_to_string(f).expect("read kernel source");
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        for name in kernel_names(&src) {
            if table.iter().any(|(k, _)| *k == name) {
                panic!("kernel {name} is defined twice in kernels/");
            }
            table.push((name, stem.clone()));
        }
    }

    // The emulator's own test kernels live apart from the production ones: compiled for
    // the emulator only, never to PTX, and not listed in KERNELS.
    let selftest = kdir.join(EMU_SELFTEST);
    let selftest_names =
        kernel_names(&fs::read_to_string(&selftest).expect("read emulator self-tests"));
    let mut emu_files = files.clone();
    emu_files.push(selftest.clone());
    let mut emu_table = table.clone();
    for name in &selftest_names {
        if emu_table.iter().any(|(k, _)| k == name) {
            panic!("kernel {name} is defined twice in kernels/");
        }
        emu_table.push((name.clone(), "selftest".into()));
    }
    build_emulator(&kdir, &out, &emu_files, &emu_table);
    let ptx = build_ptx(&kdir, &out, &files);

    // Rust side: kernel table and embedded PTX.
    let mut rs = String::new();
    writeln!(
        rs,
        "/// Every kernel in `kernels/*.cu`: (kernel name, file stem)."
    )
    .unwrap();
    writeln!(rs, "pub const KERNELS: &[(&str, &str)] = &[").unwrap();
    for (k, m) in &table {
        writeln!(rs, "    ({k:?}, {m:?}),").unwrap();
    }
    writeln!(rs, "];").unwrap();
    writeln!(
        rs,
        "/// The emulator's self-test kernels (`kernels/{EMU_SELFTEST}`): emulator only."
    )
    .unwrap();
    writeln!(
        rs,
        "pub const EMU_SELFTEST_KERNELS: &[&str] = &{selftest_names:?};"
    )
    .unwrap();
    writeln!(
        rs,
        "/// PTX per file stem; empty when the crate was built without nvcc."
    )
    .unwrap();
    writeln!(rs, "pub const PTX: &[(&str, &str)] = &[").unwrap();
    for (stem, path) in &ptx.modules {
        writeln!(
            rs,
            "    ({stem:?}, include_str!({:?})),",
            path.display().to_string()
        )
        .unwrap();
    }
    writeln!(rs, "];").unwrap();
    writeln!(
        rs,
        "/// GPU architecture the PTX targets (`sm_XX`), or empty."
    )
    .unwrap();
    writeln!(rs, "pub const PTX_ARCH: &str = {:?};", ptx.arch).unwrap();
    writeln!(
        rs,
        "/// ptxas register/spill report (embedded at build time, so a binary carried to \
         another machine still has it), or empty."
    )
    .unwrap();
    if ptx.report.is_empty() {
        writeln!(rs, "pub const PTXAS_REPORT: &str = \"\";").unwrap();
    } else {
        writeln!(
            rs,
            "pub const PTXAS_REPORT: &str = include_str!({:?});",
            ptx.report
        )
        .unwrap();
    }
    fs::write(out.join("kernels_gen.rs"), rs).unwrap();
}

/// Names of `__global__` kernels, in source order.
fn kernel_names(src: &str) -> Vec<String> {
    let src = strip_comments(src);
    let mut names = Vec::new();
    let mut rest = src.as_str();
    while let Some(i) = rest.find("__global__") {
        rest = &rest[i + "__global__".len()..];
        let mut s = rest.trim_start();
        let Some(t) = s.strip_prefix("void") else {
            continue;
        };
        s = t.trim_start();
        if let Some(t) = s.strip_prefix("__launch_bounds__") {
            // skip the balanced parenthesis group
            let mut depth = 0;
            let mut end = 0;
            for (j, c) in t.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = j + 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            s = t[end..].trim_start();
        }
        let name: String = s
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && s[name.len()..].trim_start().starts_with('(') {
            names.push(name);
        }
    }
    names
}

fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'/' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'*' {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn build_emulator(kdir: &Path, out: &Path, files: &[PathBuf], table: &[(String, String)]) {
    let gen = out.join("emu");
    fs::create_dir_all(&gen).unwrap();
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .include(kdir)
        .flag_if_supported("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unused-variable")
        .flag_if_supported("-Wno-unused-function")
        .opt_level(2)
        .warnings(true);
    if let Ok(s) = env::var("POPEN_EMU_SANITIZE") {
        if !s.is_empty() {
            // e.g. POPEN_EMU_SANITIZE=address: bounds-check every emulated kernel access.
            build
                .flag(format!("-fsanitize={s}"))
                .flag("-fno-omit-frame-pointer")
                // fibers switch through ucontext, which the sanitizers follow
                .define("POPEN_EMU_UCONTEXT", None);
            println!("cargo:rustc-link-lib=dylib=asan");
        }
    }
    build.file(kdir.join("emu/cuda_emu.cpp"));
    for f in files {
        let stem = f.file_stem().unwrap().to_string_lossy();
        let mut w = String::new();
        writeln!(w, "#include \"{}\"", f.display()).unwrap();
        writeln!(w, "#include \"emu/emu_api.h\"").unwrap();
        for (k, m) in table {
            if *m == stem {
                writeln!(
                    w,
                    "extern \"C\" void popen_emu_tramp_{k}(void** a) {{ emu::call(&{k}, a); }}"
                )
                .unwrap();
                writeln!(
                    w,
                    "extern \"C\" const EmuKernel popen_emu_entry_{k} = emu::entry(\"{k}\", &popen_emu_tramp_{k}, &{k});"
                )
                .unwrap();
            }
        }
        let p = gen.join(format!("{stem}.cpp"));
        fs::write(&p, w).unwrap();
        build.file(p);
    }
    let mut t = String::new();
    writeln!(t, "#include \"emu/emu_api.h\"\n#include <cstring>").unwrap();
    for (k, _) in table {
        writeln!(t, "extern \"C\" const EmuKernel popen_emu_entry_{k};").unwrap();
    }
    writeln!(t, "static const EmuKernel* const kTable[] = {{").unwrap();
    for (k, _) in table {
        writeln!(t, "    &popen_emu_entry_{k},").unwrap();
    }
    writeln!(t, "    nullptr}};").unwrap();
    writeln!(
        t,
        "extern \"C\" const EmuKernel* popen_emu_find(const char* name) {{\n  for (const EmuKernel* const* e = kTable; *e; ++e)\n    if (std::strcmp((*e)->name, name) == 0) return *e;\n  return nullptr;\n}}"
    )
    .unwrap();
    let p = gen.join("emu_table.cpp");
    fs::write(&p, t).unwrap();
    build.file(p);
    build.compile("popen_emu");
}

struct PtxBuild {
    modules: Vec<(String, PathBuf)>,
    arch: String,
    report: String,
}

fn find_nvcc() -> Option<PathBuf> {
    if let Ok(p) = env::var("NVCC") {
        if !p.is_empty() {
            return Some(PathBuf::from(p));
        }
    }
    if let Ok(h) = env::var("CUDA_HOME") {
        let p = Path::new(&h).join("bin/nvcc");
        if p.exists() {
            return Some(p);
        }
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join("nvcc"))
        .find(|p| p.exists())
}

fn build_ptx(kdir: &Path, out: &Path, files: &[PathBuf]) -> PtxBuild {
    let none = PtxBuild {
        modules: vec![],
        arch: String::new(),
        report: String::new(),
    };
    if env::var("POPEN_SKIP_NVCC").is_ok_and(|v| v == "1") {
        println!("cargo:warning=POPEN_SKIP_NVCC=1: kernels not compiled to PTX; the CUDA backend will have no kernels");
        return none;
    }
    let Some(nvcc) = find_nvcc() else {
        println!(
            "cargo:warning=nvcc not found ($NVCC, $CUDA_HOME/bin, PATH): kernels not compiled to PTX; \
             the CUDA backend will have no kernels (tools/install_nvcc.sh installs nvcc 13.0)"
        );
        return none;
    };
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let arch = format!("sm_{}", cap.trim().trim_start_matches("sm_"));
    let ptxas = nvcc.with_file_name("ptxas");
    let mut modules = Vec::new();
    let mut report = String::new();
    for f in files {
        let stem = f.file_stem().unwrap().to_string_lossy().to_string();
        let ptx = out.join(format!("{stem}.ptx"));
        let o = Command::new(&nvcc)
            .args(["-ptx", "-O3", "-lineinfo", "-std=c++17", "--use_fast_math"])
            .arg(format!("-arch={arch}"))
            .arg("-I")
            .arg(kdir)
            .arg("-o")
            .arg(&ptx)
            .arg(f)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        if !o.status.success() {
            panic!(
                "nvcc failed on {}:\n{}{}",
                f.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let r = Command::new(&ptxas)
            .arg(format!("-arch={arch}"))
            .arg("-v")
            .arg(&ptx)
            .arg("-o")
            .arg("/dev/null")
            .output();
        match r {
            Ok(r) if r.status.success() => {
                let text = String::from_utf8_lossy(&r.stderr).to_string();
                for line in text.lines() {
                    if line.contains("spill")
                        && !line.contains(" 0 bytes spill stores, 0 bytes spill loads")
                    {
                        println!("cargo:warning={stem}: {}", line.trim());
                    }
                }
                writeln!(report, "== {stem}.cu ({arch})\n{text}").unwrap();
            }
            Ok(r) => panic!(
                "ptxas failed on {}:\n{}",
                ptx.display(),
                String::from_utf8_lossy(&r.stderr)
            ),
            Err(e) => println!("cargo:warning=ptxas not run ({e}); no register report"),
        }
        modules.push((stem, ptx));
    }
    let rp = out.join("ptxas-report.txt");
    fs::write(&rp, &report).unwrap();
    PtxBuild {
        modules,
        arch,
        report: rp.display().to_string(),
    }
}
