// pgjdbc against pgguard: the scenario tests/compat/test_pgjdbc.py drives. Run as a
// single-file program (java -cp postgresql.jar Compat.java HOST PORT); prints one JSON
// object per line (values are numbers or plain strings, escaped below).
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;
import java.util.concurrent.CompletableFuture;
import org.postgresql.util.PSQLException;
import org.postgresql.util.ServerErrorMessage;

public class Compat {
    static String url;

    static Connection connect(String user) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", user);
        props.setProperty("prepareThreshold", "1"); // a named server-side statement at once
        props.setProperty("connectTimeout", "60");
        props.setProperty("loginTimeout", "60");
        return DriverManager.getConnection(url, props);
    }

    static String json(String s) {
        StringBuilder b = new StringBuilder("\"");
        for (char ch : s.toCharArray()) {
            if (ch == '"' || ch == '\\') b.append('\\').append(ch);
            else if (ch < 0x20) b.append(String.format("\\u%04x", (int) ch));
            else b.append(ch);
        }
        return b.append('"').toString();
    }

    static int one(Statement st, String sql) throws SQLException {
        try (ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getInt(1);
        }
    }

    public static void main(String[] args) throws Exception {
        url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/postgres";
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));

        // Query, prepared statement (twice), transaction rolled back.
        // Role "other" has no limit here (a closed session frees its slot only once the
        // server has closed it, so the limited roles below start from a clean slate).
        try (Connection c = connect("other"); Statement st = c.createStatement()) {
            int query = one(st, "SELECT 1 + 1");
            int[] prepared = new int[2];
            try (PreparedStatement ps = c.prepareStatement("SELECT ?::int + 1")) {
                int[] inputs = {41, 1};
                for (int i = 0; i < 2; i++) {
                    ps.setInt(1, inputs[i]);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        prepared[i] = rs.getInt(1);
                    }
                }
            }
            c.setAutoCommit(false);
            st.execute("CREATE TEMP TABLE t (v int)");
            st.execute("INSERT INTO t VALUES (1), (2)");
            int inside = one(st, "SELECT count(*) FROM t");
            c.rollback();
            c.setAutoCommit(true);
            int after = one(st, "SELECT count(*) FROM pg_class WHERE relname = 't' AND relpersistence = 't'");
            System.out.println("{\"step\": \"basic\", \"query\": " + query + ", \"prepared\": [" + prepared[0]
                + ", " + prepared[1] + "], \"inside\": " + inside + ", \"after\": " + after + "}");
        }

        // Role "app": limit 1, policy reject.
        try (Connection held = connect("app")) {
            try (Connection extra = connect("app")) {
                System.out.println("{\"step\": \"reject\", \"error\": null}");
            } catch (PSQLException e) {
                ServerErrorMessage m = e.getServerErrorMessage();
                System.out.println("{\"step\": \"reject\", \"error\": {\"code\": " + json(e.getSQLState())
                    + ", \"severity\": " + json(m == null ? "" : m.getSeverity())
                    + ", \"message\": " + json(m == null ? e.getMessage() : m.getMessage()) + "}}");
            }
        }

        // Role "app2": limit 1, policy queue.
        Connection first = connect("app2");
        CompletableFuture<Connection> second = CompletableFuture.supplyAsync(() -> {
            try {
                return connect("app2");
            } catch (SQLException e) {
                throw new RuntimeException(e);
            }
        });
        System.out.println("{\"step\": \"holding\"}");
        System.out.flush();
        in.readLine(); // the test saw the second client queue at pgguard
        first.close();
        try (Connection c = second.get(); Statement st = c.createStatement()) {
            System.out.println("{\"step\": \"queued\", \"n\": " + one(st, "SELECT 42") + "}");
        }
    }
}
