//! What `uhmm run` asks of the library, read from the environment it sets.

/// The library's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settings {
    /// `UHMM_RAM_BUDGET`: the budget in bytes; none: no tier, blocks stay
    /// in RAM.
    pub(crate) ram_budget: Option<u64>,
    /// `UHMM_MIN_SIZE`: the smallest allocation or mapping uhmm takes, in
    /// bytes. Default: 1 MiB.
    pub(crate) min_size: usize,
    /// `UHMM_REPORT`: a directory where each process writes its report at
    /// exit (`PID.json`).
    pub(crate) report: Option<std::path::PathBuf>,
    /// `UHMM_DEVICE`: where cold pages go, a far store's address
    /// (`file:PATH`, `redis://…`); none: the compressed store in RAM.
    pub(crate) device: Option<uhmm_devices::far::FarAddress>,
}

/// The default [`Settings::min_size`].
pub(crate) const DEFAULT_MIN_SIZE: usize = 1 << 20;

impl Settings {
    /// Reads the settings; `Err` names a variable that does not parse.
    pub(crate) fn from_env() -> Result<Settings, String> {
        let num = |name: &str| -> Result<Option<u64>, String> {
            match std::env::var(name) {
                Ok(v) => v.trim().parse().map(Some).map_err(|_| format!("{name}={v:?} is not a number of bytes")),
                Err(_) => Ok(None),
            }
        };
        let min_size = num("UHMM_MIN_SIZE")?.map_or(DEFAULT_MIN_SIZE, |n| n.max(uhmm::PAGE_SIZE as u64) as usize);
        let device = match std::env::var("UHMM_DEVICE") {
            Ok(v) if v == "compress" || v.is_empty() => None,
            Ok(v) => Some(uhmm_devices::far::FarAddress::parse(&v).map_err(|e| format!("UHMM_DEVICE: {e}"))?),
            Err(_) => None,
        };
        Ok(Settings {
            device,
            ram_budget: num("UHMM_RAM_BUDGET")?,
            min_size,
            report: std::env::var_os("UHMM_REPORT").map(Into::into),
        })
    }
}
