//! `bench`: restore latency and live-update blackout.

use std::path::PathBuf;

use clap::Subcommand;
use waterbear::vmm::config::parse_size;

use crate::{report, EXIT_ERROR, EXIT_OK};

#[derive(Subcommand)]
pub(crate) enum BenchCommand {
    /// Per-VM restore latency (memory in place vs copied, for each size, and several
    /// VMs restored together) and the live-update blackout.
    Restore(BenchArgs),
    /// Only the live-update blackout.
    Update(BenchArgs),
}

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Guest memory sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "128M,512M,1G,4G")]
    sizes: Vec<String>,

    /// Numbers of VMs restored at the same time.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    vms: Vec<usize>,

    /// Live updates per memory size.
    #[arg(long, default_value_t = 10)]
    updates: usize,

    /// Directory for memory files and snapshots (tmpfs keeps disk speed out of it).
    #[arg(long, default_value = "/dev/shm")]
    work_dir: PathBuf,

    /// Write the figures as JSON here.
    #[arg(long, value_name = "PATH", default_value = "bench-restore.json")]
    json: PathBuf,

    /// Also write the tables as Markdown here.
    #[arg(long, value_name = "PATH")]
    markdown: Option<PathBuf>,
}

pub(crate) fn bench(args: BenchArgs, restores_too: bool) -> u8 {
    use waterbear::bench;
    let sizes: Vec<u64> = match args
        .sizes
        .iter()
        .map(|s| parse_size(s).map(|b| b >> 20))
        .collect()
    {
        Ok(v) => v,
        Err(e) => {
            report(&e);
            return EXIT_ERROR;
        }
    };
    let dir = match tempfile_dir(&args.work_dir) {
        Ok(d) => d,
        Err(e) => {
            report(&e);
            return EXIT_ERROR;
        }
    };
    let result = (|| {
        let mut restores = Vec::new();
        for &mib in sizes.iter().filter(|_| restores_too) {
            for copy in [false, true] {
                let r = bench::restore_round(&dir, mib, 1, copy)?;
                eprintln!(
                    "restore {mib} MiB {}: {:.2} ms to vCPUs running",
                    r.mode, r.startup_ms_median
                );
                restores.push(r);
            }
        }
        let small = sizes.first().copied().unwrap_or(128);
        for &n in args.vms.iter().filter(|&&n| n > 1 && restores_too) {
            let r = bench::restore_round(&dir, small, n, false)?;
            eprintln!(
                "restore {n} x {small} MiB: {:.2} ms median",
                r.startup_ms_median
            );
            restores.push(r);
        }
        let mut updates = Vec::new();
        for &mib in &sizes {
            let u = bench::update_round(&dir, mib, args.updates)?;
            eprintln!(
                "live update {mib} MiB: {:.2} ms median blackout",
                u.blackout_ms_median
            );
            updates.push(u);
        }
        Ok::<_, bench::BenchError>((restores, updates))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let (restores, updates) = match result {
        Ok(v) => v,
        Err(e) => {
            report(&e);
            return EXIT_ERROR;
        }
    };
    let table = bench::markdown(&restores, &updates);
    println!("{table}");
    let json = serde_json::json!({"restore": restores, "live_update": updates});
    let mut outputs = vec![(
        args.json,
        serde_json::to_string_pretty(&json).unwrap_or_default(),
    )];
    outputs.extend(args.markdown.map(|p| (p, table)));
    for (path, text) in outputs {
        if let Err(e) = bench::write(&path, &text) {
            report(&e);
            return EXIT_ERROR;
        }
    }
    EXIT_OK
}

/// A fresh directory under `parent` for one benchmark run.
pub(crate) fn tempfile_dir(parent: &std::path::Path) -> std::io::Result<PathBuf> {
    let dir = parent.join(format!("waterbear-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
