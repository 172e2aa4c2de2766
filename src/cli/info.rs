//! `popen info`: what this build holds.
use popen::kernels::{Device, KERNELS, PTXAS_REPORT, PTX_ARCH};

/// Arguments of `popen info`.
#[derive(clap::Args)]
pub struct Args {
    /// Also print the ptxas register/spill report of every kernel.
    #[arg(long)]
    pub ptxas: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    println!("popen {}", env!("CARGO_PKG_VERSION"));
    println!("kernels: {}", KERNELS.len());
    for (k, file) in KERNELS {
        println!("  {file}.cu  {k}");
    }
    if PTX_ARCH.is_empty() {
        println!("PTX: not built (no nvcc at build time)");
    } else {
        println!("PTX: {PTX_ARCH}");
    }
    match Device::cuda(0) {
        Ok(_) => println!("cuda device 0: available"),
        Err(e) => println!("cuda device 0: unavailable ({e})"),
    }
    if a.ptxas {
        if PTXAS_REPORT.is_empty() {
            println!("ptxas report: none (no nvcc at build time)");
        } else {
            print!("{PTXAS_REPORT}");
        }
    }
    Ok(())
}
