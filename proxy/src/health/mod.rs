//! Server health: active HTTP checks with hysteresis ([`hysteresis`]),
//! passive ejection on observed failures ([`passive`]), and the task that
//! runs the checks ([`checker`]).

pub mod checker;
pub mod hysteresis;
pub mod passive;
