//! Drawing the screen model with ratatui: one styled line per line of the model.

use ratatui::style::{Modifier, Style};
use ratatui::text::{Line as TextLine, Text};
use ratatui::widgets::Paragraph;
use ratatui::Frame as TerminalFrame;

use super::model::{Kind, Line};

fn style(kind: Kind) -> Style {
    match kind {
        Kind::Title => Style::new().add_modifier(Modifier::REVERSED),
        Kind::Header => Style::new().add_modifier(Modifier::BOLD),
        Kind::Row => Style::new(),
        Kind::More | Kind::Note => Style::new().add_modifier(Modifier::DIM),
    }
}

/// Draws `lines` from the top left of the terminal.
pub fn draw(f: &mut TerminalFrame<'_>, lines: &[Line]) {
    let text: Text<'_> = lines
        .iter()
        .map(|l| TextLine::styled(l.text.as_str(), style(l.kind)))
        .collect();
    f.render_widget(Paragraph::new(text), f.area());
}
