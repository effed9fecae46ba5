//! Fitting text to the terminal: table columns to its width (columns that do not fit are
//! dropped, least useful first; names are shortened), and lists to its height (a list that
//! does not fit ends with a "+N more" line).

use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

/// How a column's cells line up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Figures.
    Right,
}

/// One column of a table.
#[derive(Debug, Clone)]
pub struct Column {
    /// Its header.
    pub header: String,
    /// Left for text, right for figures.
    pub align: Align,
    /// A name, which may be shortened to fit; figures are never shortened.
    pub flexible: bool,
    /// Columns with a lower `keep` are dropped first when the width is short; 0 is never
    /// dropped.
    pub keep: u8,
}

impl Column {
    /// A column of names.
    pub fn name(header: impl Into<String>) -> Self {
        Column {
            header: header.into(),
            align: Align::Left,
            flexible: true,
            keep: 0,
        }
    }

    /// A column of short text (states, drivers), dropped in the order of `keep`.
    pub fn text(header: impl Into<String>, keep: u8) -> Self {
        Column {
            header: header.into(),
            align: Align::Left,
            flexible: false,
            keep,
        }
    }

    /// A column of figures, dropped in the order of `keep`.
    pub fn figure(header: impl Into<String>, keep: u8) -> Self {
        Column {
            header: header.into(),
            align: Align::Right,
            flexible: false,
            keep,
        }
    }
}

/// Spaces between columns.
const GAP: usize = 2;
/// Names are shortened to this before any column is dropped.
const NAME_MIN: usize = 12;
/// And to this when even the columns that are never dropped do not fit.
const NAME_FLOOR: usize = 4;

/// Width of a text in terminal cells.
pub fn width(s: &str) -> usize {
    UnicodeWidthStr::width(s)
}

/// `s` with control characters, which would move the cursor or start escape sequences,
/// replaced by `?`: names come from the engine, which takes any UTF-8.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `s` cut to at most `w` cells, a cut one ending with `~`.
pub fn truncate(s: &str, w: usize) -> String {
    if width(s) <= w {
        return s.to_string();
    }
    if w == 0 {
        return String::new();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let cw = UnicodeWidthChar::width(c).unwrap_or(0);
        if used + cw > w - 1 {
            break;
        }
        out.push(c);
        used += cw;
    }
    out.push('~');
    out
}

/// The end of `s` in at most `w` cells, a cut one starting with `~`.
pub fn keep_end(s: &str, w: usize) -> String {
    if width(s) <= w {
        return s.to_string();
    }
    if w == 0 {
        return String::new();
    }
    let mut tail = Vec::new();
    let mut used = 0;
    for c in s.chars().rev() {
        let cw = UnicodeWidthChar::width(c).unwrap_or(0);
        if used + cw > w - 1 {
            break;
        }
        tail.push(c);
        used += cw;
    }
    std::iter::once('~').chain(tail.into_iter().rev()).collect()
}

fn pad(s: &str, w: usize, align: Align) -> String {
    let s = truncate(s, w);
    let fill = " ".repeat(w - width(&s));
    match align {
        Align::Left => s + &fill,
        Align::Right => fill + &s,
    }
}

/// The lines of a table (its header first) fitted to `max_width` cells.
pub fn table_lines(columns: &[Column], rows: &[Vec<String>], max_width: usize) -> Vec<String> {
    let natural: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|cell| width(cell))
                .chain([width(&c.header)])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut widths = natural.clone();
    let mut shown: Vec<bool> = vec![true; columns.len()];
    let total = |widths: &[usize], shown: &[bool]| {
        let (sum, n) = widths
            .iter()
            .zip(shown)
            .filter(|(_, s)| **s)
            .fold((0usize, 0usize), |(sum, n), (w, _)| (sum + w, n + 1));
        sum + GAP * n.saturating_sub(1)
    };
    let shrink_names = |widths: &mut Vec<usize>, shown: &[bool], floor: usize| {
        // The widest name gives way first, down to `floor`.
        while total(widths, shown) > max_width {
            let widest = (0..columns.len())
                .filter(|&i| shown[i] && columns[i].flexible && widths[i] > floor)
                .max_by_key(|&i| widths[i]);
            let Some(i) = widest else { break };
            let excess = total(widths, shown) - max_width;
            widths[i] = widths[i].saturating_sub(excess).max(floor);
        }
    };
    shrink_names(&mut widths, &shown, NAME_MIN);
    while total(&widths, &shown) > max_width {
        // The droppable column with the lowest keep, the rightmost among equals.
        let least = (0..columns.len())
            .filter(|&i| shown[i] && columns[i].keep > 0)
            .min_by_key(|&i| (columns[i].keep, std::cmp::Reverse(i)));
        let Some(i) = least else { break };
        shown[i] = false;
        // A name shortened for the dropped column may take back its room.
        widths.clone_from(&natural);
        shrink_names(&mut widths, &shown, NAME_MIN);
    }
    shrink_names(&mut widths, &shown, NAME_FLOOR);
    let line = |cells: &mut dyn Iterator<Item = (usize, &str)>| {
        let parts: Vec<String> = cells
            .filter(|(i, _)| shown[*i])
            .map(|(i, cell)| pad(cell, widths[i], columns[i].align))
            .collect();
        truncate(parts.join(&" ".repeat(GAP)).trim_end(), max_width)
    };
    let mut out = vec![line(
        &mut columns
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.header.as_str())),
    )];
    for row in rows {
        out.push(line(
            &mut row.iter().enumerate().map(|(i, cell)| (i, cell.as_str())),
        ));
    }
    out
}

/// Lines given to each of several lists whose bodies want `wants` lines, within `budget`: all
/// they want when that fits, else shared out one line at a time, in turn, so that every list
/// shows its first lines before any shows more.
pub fn allot(wants: &[usize], budget: usize) -> Vec<usize> {
    let mut given = vec![0; wants.len()];
    let mut left = budget;
    while left > 0 {
        let mut gave = false;
        for (g, w) in given.iter_mut().zip(wants) {
            if left > 0 && *g < *w {
                *g += 1;
                left -= 1;
                gave = true;
            }
        }
        if !gave {
            break;
        }
    }
    given
}
