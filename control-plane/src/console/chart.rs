//! Charts as SVG, drawn on the server: no script, no library, nothing fetched.

use maud::{Markup, html};

const WIDTH: i64 = 640;
const HEIGHT: i64 = 160;
const PAD_LEFT: i64 = 60;
const PAD_BOTTOM: i64 = 20;
const PAD_TOP: i64 = 10;

/// One day's figures: the balance at its end and the credits used in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Day {
    pub balance: i64,
    pub used: i64,
}

/// Where value `value` of `min..=max` sits on the plot's vertical axis.
fn y_of(value: i64, min: i64, max: i64) -> i64 {
    let plot = HEIGHT - PAD_BOTTOM - PAD_TOP;
    let span = i128::from(max) - i128::from(min);
    if span <= 0 {
        return HEIGHT - PAD_BOTTOM;
    }
    let offset = (i128::from(value) - i128::from(min)) * i128::from(plot) / span;
    HEIGHT - PAD_BOTTOM - i64::try_from(offset).unwrap_or(0)
}

/// Where day `index` of `count` sits on the horizontal axis.
fn x_of(index: usize, count: usize) -> i64 {
    let plot = WIDTH - PAD_LEFT - 10;
    let steps = i64::try_from(count.saturating_sub(1).max(1)).unwrap_or(1);
    PAD_LEFT + i64::try_from(index).unwrap_or(0) * plot / steps
}

/// The balance at the end of each day, as a line.
pub fn balance(days: &[Day], first_label: &str, last_label: &str) -> Markup {
    let min = days.iter().map(|day| day.balance).min().unwrap_or(0).min(0);
    let max = days.iter().map(|day| day.balance).max().unwrap_or(0).max(1);
    let points = days
        .iter()
        .enumerate()
        .map(|(index, day)| {
            format!(
                "{},{}",
                x_of(index, days.len()),
                y_of(day.balance, min, max)
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    html! {
        svg.chart id="balance-chart" role="img" aria-label="Balance over the last 30 days"
            width=(WIDTH) height=(HEIGHT) viewBox={"0 0 " (WIDTH) " " (HEIGHT)} xmlns="http://www.w3.org/2000/svg" {
            line.axis x1=(PAD_LEFT) y1=(y_of(min, min, max)) x2=(WIDTH - 10) y2=(y_of(min, min, max)) {}
            line.axis x1=(PAD_LEFT) y1=(y_of(max, min, max)) x2=(WIDTH - 10) y2=(y_of(max, min, max)) {}
            text x="4" y=(y_of(max, min, max) + 4) { (max) }
            text x="4" y=(y_of(min, min, max) + 4) { (min) }
            text x=(PAD_LEFT) y=(HEIGHT - 4) { (first_label) }
            text x=(WIDTH - 80) y=(HEIGHT - 4) { (last_label) }
            polyline.line points=(points) {}
        }
    }
}

/// Credits used per day, as bars.
pub fn usage(days: &[Day], first_label: &str, last_label: &str) -> Markup {
    let max = days.iter().map(|day| day.used).max().unwrap_or(0).max(1);
    let slot = (WIDTH - PAD_LEFT - 10) / i64::try_from(days.len().max(1)).unwrap_or(1);
    let bottom = HEIGHT - PAD_BOTTOM;
    html! {
        svg.chart id="usage-chart" role="img" aria-label="Credits used per day"
            width=(WIDTH) height=(HEIGHT) viewBox={"0 0 " (WIDTH) " " (HEIGHT)} xmlns="http://www.w3.org/2000/svg" {
            line.axis x1=(PAD_LEFT) y1=(bottom) x2=(WIDTH - 10) y2=(bottom) {}
            text x="4" y=(y_of(max, 0, max) + 4) { (max) }
            text x="4" y=(bottom + 4) { "0" }
            text x=(PAD_LEFT) y=(HEIGHT - 4) { (first_label) }
            text x=(WIDTH - 80) y=(HEIGHT - 4) { (last_label) }
            @for (index, day) in days.iter().enumerate() {
                @let top = y_of(day.used, 0, max);
                @if day.used > 0 {
                    rect.bar x=(PAD_LEFT + i64::try_from(index).unwrap_or(0) * slot + 1) y=(top)
                        width=((slot - 2).max(1)) height=((bottom - top).max(1)) {
                        title { (day.used) " credits" }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Values map into the plot, the extremes onto its edges, and a flat series does not
    // divide by zero.
    #[test]
    fn scales() {
        assert_eq!(y_of(0, 0, 100), HEIGHT - PAD_BOTTOM);
        assert_eq!(y_of(100, 0, 100), PAD_TOP);
        assert_eq!(y_of(5, 5, 5), HEIGHT - PAD_BOTTOM);
        assert_eq!(y_of(i64::MAX, i64::MIN, i64::MAX), PAD_TOP);
        assert_eq!(x_of(0, 30), PAD_LEFT);
        assert_eq!(x_of(29, 30), WIDTH - 10);
        assert_eq!(x_of(0, 1), PAD_LEFT);
    }

    #[test]
    fn charts_draw_every_day() {
        let days = vec![
            Day {
                balance: 10,
                used: 0,
            },
            Day {
                balance: 4,
                used: 6,
            },
        ];
        let line = balance(&days, "a", "b").into_string();
        assert!(line.contains(&format!("points=\"{PAD_LEFT},")), "{line}");
        let bars = usage(&days, "a", "b").into_string();
        assert_eq!(bars.matches("<rect").count(), 1, "{bars}");
    }
}
