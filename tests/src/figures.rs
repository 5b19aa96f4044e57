//! Small helpers for printing the load tools' figures.

/// `a / b` with two decimals, or `n/a` when there is no baseline (`b` is zero).
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2}", a / b)
    } else {
        "n/a".to_string()
    }
}
