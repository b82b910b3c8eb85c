//! Loading the kernel modules the initramfs carries (`/lib/modules/<file>.ko`, uncompressed,
//! in dependency order as `machine.json` lists them) with `finit_module`, so the kernel reads
//! each file itself. There is no `modprobe`: the order is the export's, resolved from the
//! kernel's `modules.dep`.

use std::fs::File;
use std::io;
use std::path::Path;

use rustix::io::Errno;

/// Why a module did not load.
#[derive(Debug, thiserror::Error)]
#[error("loading module {path}: {source}")]
pub struct Error {
    /// The module's file.
    pub path: String,
    /// The kernel's answer.
    #[source]
    pub source: io::Error,
}

/// Loads each of `names` from `dir`, in order. A module already in the kernel (built in, or
/// loaded as another's dependency) is not an error.
pub fn load_all(dir: &Path, names: &[String]) -> Result<(), Error> {
    for name in names {
        let path = dir.join(name);
        let err = |source| Error {
            path: path.display().to_string(),
            source,
        };
        let file = File::open(&path).map_err(err)?;
        match rustix::system::finit_module(&file, c"", 0) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(err(e.into())),
        }
    }
    Ok(())
}
